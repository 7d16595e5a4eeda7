"""Bad or unusual inputs of `simmerge zoo build`, `label` and `pipeline`/`demo`, and damaged run
folders: one line naming the file, field or option, before any work; nothing of the user's
replaced; a damaged stage record runs the stage again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.testbed.zoo_config import ZooConfig
from input_checks import one_line_error as _one_line  # beside this file

TINY = Path(__file__).resolve().parents[1] / "configs" / "zoo_tiny.yaml"


def _zoo(tmp_path: Path, old: str, new: str) -> Path:
    raw = TINY.read_text()
    assert raw.count(old) == 1, old
    path = tmp_path / "zoo.yaml"
    path.write_text(raw.replace(old, new, 1))
    return path



# ---- the zoo config --------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, field, message", [
    ("{name: math-lora,", "{name: math-a,", "domains.math.variants.1.name",
     "'math-a' is already the name of domains.math.variants.0"),
    ("name: rag-a", "name: code-a", "domains.rag.variants.0.name", "'code-a' is already the name of domains.code.variants.0"),
    ("name: inst-a", "name: base", "domains.instruct.variants.0.name", "'base' is reserved for the base model"),
    ("{name: code-a,", "{name: code-a, start: continued,", "domains.code.variants.0.start",
     "expert code-a starts from 'continued', but the config has no 'continued' section"),
])
def test_whole_config_errors_name_the_variant_s_field(tmp_path, old, new, field, message):
    """A name used twice, an expert named 'base' or one starting from a 'continued' section the
    config lacks was reported at `config: Value error, ...`: now at the variant's field."""
    bad = _zoo(tmp_path, old, new)
    with pytest.raises(ConfigError) as e:
        ZooConfig.load(bad)
    assert str(e.value).startswith(f"{bad}: {field}: {message}"), e.value
    assert len(str(e.value).splitlines()) == 1


def test_a_domain_listed_twice_is_refused_naming_the_line(tmp_path, capsys):
    """YAML keeps the last of two equal keys: a config listing `math:` twice trained a zoo without
    the first block's experts, without a word. Refused, naming the line; nothing written."""
    from simmerge_ray.cli import main

    bad = _zoo(tmp_path, "  rag:\n", "  math:\n")
    before = bad.read_text()
    assert main(["zoo", "build", "--config", str(bad), "--out", str(tmp_path / "z")]) == 2
    _one_line(capsys, f"{bad}: invalid YAML at line 19, column 3: key 'math' given twice in one mapping")
    assert not (tmp_path / "z").exists() and bad.read_text() == before
    # a key merged in with `<<:` may still be overridden, as YAML intends
    merged = _zoo(tmp_path, "base: {steps: 60, lr: 0.004,", "base: {<<: {steps: 7}, steps: 60, lr: 0.004,")
    assert ZooConfig.load(merged).digest() == ZooConfig.load(TINY).digest()


@pytest.mark.parametrize("old, new, field", [
    ("seed: 0\narch", f"seed: {2**64}\narch", "seed"),
    ("seed: 1}", f"seed: {10**30}}}", "base.seed"),
    ("lr: 0.004, seed: 41}", f"lr: 0.004, seed: {-(2**63) - 1}}}", "domains.rag.variants.0.seed"),
])
def test_a_seed_torch_cannot_take_is_refused_at_load(tmp_path, old, new, field):
    """torch.manual_seed takes [-2**63, 2**64): a seed past it loaded, then failed in a Ray task's
    traceback after pretraining. The seeds torch takes (those of every valid config) still load."""
    with pytest.raises(ConfigError, match=rf"^{_zoo(tmp_path, old, new)}: {field}: Input should be"):
        ZooConfig.load(tmp_path / "zoo.yaml")
    for ok in (2**64 - 1, -(2**63)):
        assert ZooConfig.load(_zoo(tmp_path, "seed: 1}", f"seed: {ok}}}")).base.seed == ok


# ---- pipeline / demo options and run folder -----------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--folds", "1", "argument --folds: 1 is not at least 2"),
    ("--seed", "-1", "argument --seed: -1 is not a seed"),
    ("--sim-repeats", "0", "argument --sim-repeats: 0 is not at least 1"),
    ("--tune-samples", "-1", "argument --tune-samples: -1 is not at least 0"),
])
def test_pipeline_options_are_checked_before_any_stage(tmp_path, capsys, no_ray, option, value, message):
    """--folds 1, --seed -1 (numpy's default_rng) and --sim-repeats 0 failed at the selector or
    bandit stage, after the zoo and the labels (hours on the default zoo; a traceback for the
    seed); a negative --tune-samples was no search, without a word."""
    from simmerge_ray.cli import main

    for command in ("pipeline", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--zoo-config", str(TINY), "--quick", "--out", str(tmp_path / "run"), option, value])
        assert exc.value.code == 2
        _one_line(capsys, f"simmerge {command}: error: {message}")
    assert not (tmp_path / "run").exists()


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path, capsys, no_ray):
    """`--out` naming a file (or a path under one) was a FileExistsError traceback."""
    from simmerge_ray.cli import main
    from simmerge_ray.pipeline import PipelineSettings, run

    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(OutputError, match=rf"^{afile}: not a folder; the run folder \(--out\)"):
        run(PipelineSettings(TINY, afile), until="zoo")
    with pytest.raises(OutputError, match=rf"^{afile / 'run'}: cannot create the output: {afile} is a file"):
        run(PipelineSettings(TINY, afile / "run"), until="zoo")
    assert main(["pipeline", "--zoo-config", str(TINY), "--quick", "--out", str(afile)]) == 2
    _one_line(capsys, f"{afile}: not a folder")
    assert afile.read_text() == "mine"


def test_the_report_never_replaces_a_users_file_in_the_run_folder(tmp_path, capsys, no_ray):
    """The report's files (report.md, report.json, charts) go at the top of --out, any folder: a
    user's report.md there was replaced once every stage was done. Refused before any work; a
    run folder whose report wrote them (its record, or an older run folder without one) is not."""
    from simmerge_ray.cli import main
    from simmerge_ray.pipeline.report import check_report_files

    run_dir = tmp_path / "notes"
    run_dir.mkdir()
    (run_dir / "report.md").write_text("my own report")
    (run_dir / "todo.txt").write_text("keep")
    assert main(["demo", "--zoo-config", str(TINY), "--quick", "--out", str(run_dir)]) == 2
    _one_line(capsys, f"{run_dir / 'report.md'}: not written by a simmerge report of this run folder")
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.md", "todo.txt"]
    assert (run_dir / "report.md").read_text() == "my own report"

    # a run folder from before the report kept a record (any stage's record: one whose later stages
    # are to run again, markers removed, included)
    (run_dir / ".stage-zoo.json").write_text(json.dumps({"key": "k", "seconds": 1.0, "files": {}}))
    check_report_files(run_dir)
    (run_dir / ".stage-report.json").write_text(json.dumps({"files": ["report.json"]}))
    with pytest.raises(OutputError, match="report.md: not written by a simmerge report"):
        check_report_files(run_dir)
    (run_dir / ".stage-report.json").write_text(json.dumps({"files": ["report.json", "report.md"]}))
    check_report_files(run_dir)


def _fake_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One cheap stage in place of the pipeline's, writing RUN/zoo/out.txt; returns its run count."""
    from simmerge_ray.pipeline import runner

    calls: list[int] = []

    def fake(s: runner.PipelineSettings, echo=print) -> list[runner.Stage]:
        def work() -> None:
            (s.out / "zoo").mkdir(exist_ok=True)
            (s.out / "zoo" / "out.txt").write_text(f"run {len(calls)}")
            calls.append(1)

        return [runner.Stage("zoo", "a cheap stage", work, ["v1"], (s.out / "zoo",))]

    monkeypatch.setattr(runner, "stages", fake)
    return calls


@pytest.mark.parametrize("edit", [{"seconds": "12 s"}, {"seconds": None}, {"files": ["zoo/out.txt"]},
                                  {"files": {"zoo/out.txt": "big"}}])
def test_an_edited_stage_record_runs_the_stage_again(tmp_path, monkeypatch, edit):
    """A finished stage's record whose `seconds` is not a number was a ValueError/TypeError
    traceback on every rerun; one whose `files` is not a mapping of stamps reused the stage
    without checking its outputs. Both say so in one line and run the stage again."""
    from simmerge_ray.pipeline import PipelineSettings, run

    calls = _fake_stage(tmp_path, monkeypatch)
    settings = PipelineSettings(TINY, tmp_path / "run")
    run(settings, echo=lambda _: None)
    marker = tmp_path / "run" / ".stage-zoo.json"
    record = json.loads(marker.read_text())
    lines: list[str] = []
    run(settings, echo=lines.append)
    assert len(calls) == 1 and lines == [f"[1/1] zoo           done earlier ({record['seconds']:.0f} s), reused"]
    marker.write_text(json.dumps({**record, **edit}))
    lines.clear()
    run(settings, echo=lines.append)
    assert len(calls) == 2
    assert lines[0] == f"{marker}: unreadable stage marker; running the stage again"
    assert set(json.loads(marker.read_text())["files"]) == {"zoo/out.txt"}
    lines.clear()
    run(settings, echo=lines.append)  # healed: reused again
    assert len(calls) == 2 and lines[0].endswith("reused")


def test_a_record_of_an_older_version_without_files_is_still_reused(tmp_path, monkeypatch):
    """A guard on the check above (passes with and without it): a marker written before markers
    listed their files is reused as it was."""
    from simmerge_ray.pipeline import PipelineSettings, run

    calls = _fake_stage(tmp_path, monkeypatch)
    settings = PipelineSettings(TINY, tmp_path / "run")
    run(settings, echo=lambda _: None)
    marker = tmp_path / "run" / ".stage-zoo.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    lines: list[str] = []
    run(settings, echo=lines.append)
    assert len(calls) == 1 and lines[0].endswith("reused")



@pytest.mark.parametrize("extra, want", [
    ([], (6, 5, 10)),
    (["--quick"], (0, 3, 2)),
    # --quick used to set 3 folds, no search and 2 repeats over what the command line asked for
    (["--quick", "--folds", "10", "--tune-samples", "4", "--sim-repeats", "5"], (4, 10, 5)),
])
def test_an_option_given_with_quick_wins(tmp_path, extra, want):
    from simmerge_ray.cli import build_parser
    from simmerge_ray.cli.demo import pipeline_settings

    args = build_parser().parse_args(["pipeline", "--zoo-config", str(TINY), "--out", str(tmp_path / "run"), *extra])
    s = pipeline_settings(args, tmp_path / "run")
    assert (s.tune_samples, s.folds, s.sim_repeats) == want
    assert (s.labels.subsets_3 == 3) == ("--quick" in extra)
