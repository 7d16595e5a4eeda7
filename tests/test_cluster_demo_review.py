"""A user's review of the demo's report and of the cluster walkthrough (README "### 5. On a
cluster", docs/cluster.md): what a reader could not tell from the output, fixed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from input_checks import one_line_error

from job_entry import load_entry  # beside this file
from simmerge_ray.cli import main


# ---- `simmerge COMMAND` with a misspelt flag --------------------------------------------------

def test_a_misspelt_flag_is_named_by_its_command_with_the_closest_option(
        no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said `simmerge: error: unrecognized arguments: --cpus-per-actr 2 (see simmerge --help)`,
    and `simmerge --help` lists no option of merge; a job with a misspelt job flag printed the same."""
    config = tmp_path / "m.yaml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    with pytest.raises(SystemExit) as e:
        main(["merge", str(config), "--out", str(tmp_path / "o"), "--cpus-per-actr", "2"])
    assert e.value.code == 2
    one_line_error(capsys, "simmerge merge: error: unrecognized arguments: --cpus-per-actr 2",
                   "--cpus-per-actr: did you mean --cpus-per-worker?", "(see simmerge merge --help)")
    for command in ("demo", "pipeline"):  # one function, two commands: each named as typed
        with pytest.raises(SystemExit):
            main([command, "--out", str(tmp_path / "r"), "--quik"])
        one_line_error(capsys, f"simmerge {command}: error: unrecognized arguments: --quik",
                       "did you mean --quick?", f"(see simmerge {command} --help)")
    with pytest.raises(SystemExit):
        main(["features", "structural", "--catalog", "c", "--out", "o", "--bogus"])
    one_line_error(capsys, "simmerge features structural: error: unrecognized arguments: --bogus (see")
    # A pool's size is --workers where the command runs the pool, --actors where Ray Data does.
    for argv, given, meant in ((["probe", "--catalog", "c", "--out", "o"], "--workers", "--actors"),
                               (["merge", str(config), "--out", "o"], "--actors", "--workers")):
        with pytest.raises(SystemExit):
            main([*argv, given, "2"])
        one_line_error(capsys, f"unrecognized arguments: {given} 2 ({given}: did you mean {meant}?)")
    with pytest.raises(SystemExit):  # plan-batch has both its planning --actors and its --merge-workers
        main(["plan-batch", "--requests", "r", "--selector", "s", "--catalog", "c", "--features", "f", "--out", "o",
              "--workers", "2"])
    one_line_error(capsys, "(--workers: did you mean --actors or --merge-workers?)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


# ---- a job's output lines name its staging folder, which the upload removes --------------------

def test_a_staged_job_says_where_the_paths_it_printed_went(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`jobs/zoo_build.py --out file://...` printed `next: simmerge features structural --catalog
    STAGING/out/catalog.yaml`, then removed STAGING: the upload line now says where that is."""
    entry = load_entry()

    def command(argv: list[str], env: dict[str, str] | None = None) -> int:
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "catalog.yaml").write_text("models: []\n")
        print(f"next: simmerge features structural --catalog {out / 'catalog.yaml'} --out feats/")
        return 0

    monkeypatch.setattr(entry, "run_command", command)
    config = tmp_path / "zoo.yaml"
    config.write_text("seed: 0\n")
    uri, staging_dir = f"file://{tmp_path}/zoo", tmp_path / "staging"
    staging = entry.staging_folder("zoo_build", uri, str(staging_dir))
    assert entry.run("zoo_build", ["--config", str(config), "--out", uri, "--staging-dir", str(staging_dir)]) == 0
    out = capsys.readouterr().out
    assert f"--catalog {staging / 'out'}/catalog.yaml" in out and not staging.exists()
    assert (f"uploaded 1 files (0.0 MB) to {uri}; paths printed above under {staging / 'out'} are there now"
            in out), out
    assert (tmp_path / "zoo" / "catalog.yaml").is_file()


# ---- report.md read alone ----------------------------------------------------------------------

def _report(eval_examples: int, pairs: int) -> dict:
    util = {"code": 0.4, "rag": 0.6, "mean": 0.5}
    way = {m: {"expert_retention": -0.1, "mean_retention": -0.2}
           for m in ("simmerge", "random_order", "equal_share", "oracle")}
    way |= {"subsets": 1, "targets": 3, "by_task": {}, "learned_minus_random_order": {}, "order_gain": {},
            "calibrated_intervals": None}
    return {
        "metric": {"utilities_on": "accuracy", "gap_epsilon": 0.05},
        "pairwise": {"split": "3-fold by unordered model pair", "pairs": pairs, "selection_accuracy": 0.25,
                     "utility": {"simmerge": util, "linear": util}, "gap_closed": {},
                     "best_fixed_arm": "linear", "simmerge_vs_best_fixed": 0.0, "simmerge_share_of_oracle": 0.9,
                     "leave_one_task_out": {"selection_accuracy": 0.3, "utility": {}}, "ablation": {}},
        "testbed": {"scores": {"base": {"expert_of": None, **{d: {"accuracy": 0.1} for d in ("code", "math", "rag")}}},
                    "eval_examples": eval_examples},
        "multiway": {"3way": way},
        "bandit": {"regret": {"bandit": {"60": 1.0}}},
        "timings": {"zoo": 1.0, "total": 1.0},
    }


def test_the_report_carries_the_runs_cautions_and_explains_its_columns() -> None:
    """The console warned that 24 eval examples and 12 labelled pairs make the tiny zoo's numbers
    noise; report.md, read alone, said nothing of it, left a domain's column out unexplained
    (math, where no pair's gap is defined) and named the multi-way methods by their keys only."""
    from simmerge_ray.pipeline.report import render_markdown

    small = render_markdown(_report(eval_examples=24, pairs=12))
    assert "**Caution:** 24 eval examples per domain give each accuracy a standard error of up to 0.102" in small
    assert "**Caution:** only 12 labelled pairs (fewer than 50)" in small
    assert "No column for math: no held-out pair with that expert has a defined two-sided utility" in small
    assert "equal_share: the model soup" in small and "oracle_random_order its rule in a random order" in small
    # A size with too few subsets for interval coverage had no row and no word.
    assert "No interval coverage measured at 3way: fewer than 3 labelled subsets of that size" in small
    big = render_markdown(copy.deepcopy(_report(eval_examples=256, pairs=176)))
    assert "Caution" not in big


def test_few_labelled_pairs_is_said_once_per_labels_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A demo's selector evaluation and its two fits read one labels file: "only 12 labelled pairs"
    was printed three times. Once per labels file and count in a process now; another file, or
    enough pairs, as before."""
    from simmerge_ray.pipeline.selector import warn_few_pairs

    a, b = tmp_path / "a" / "labels.parquet", tmp_path / "b" / "labels.parquet"
    said = []
    for command, n, labels in (("evaluate-selector", 12, a), ("fit", 12, a), ("fit", 12, a), ("fit", 12, b),
                               ("fit", 60, a)):
        warn_few_pairs(command, n, labels)
        said.append(capsys.readouterr().err)
    # which calls spoke: the first read of a, not its repeats; b (another file) again; 60 pairs not
    assert [bool(s) for s in said] == [True, False, False, True, False]
    assert said[0].startswith("simmerge evaluate-selector: warning: only 12 labelled pairs")
    assert said[3].startswith("simmerge fit: warning: only 12 labelled pairs")


# ---- a misspelt job flag is refused before the job's first step --------------------------------

def test_a_misspelt_job_flag_is_refused_before_any_step(no_ray: None, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`jobs/merge.py ... --cpus-per-actr 2` (meant --cpus-per-actor) was passed to `simmerge merge`,
    which refused it (suggesting its own --cpus-per-worker) only once the job had started; now the
    job names its own flag before running a step. A flag the command takes still goes to it."""
    entry = load_entry()
    ran: list[list[str]] = []
    monkeypatch.setattr(entry, "run_command", lambda argv, env=None: ran.append(argv) or 0)
    config = tmp_path / "m.yaml"
    config.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    for stage, typo, meant in (("merge", "--cpus-per-actr", "--cpus-per-actor"), ("label", "--max-actor", "--max-actors")):
        args = (["--config", str(config)] if stage == "merge" else []) + ["--out", str(tmp_path / "o"), typo, "4"]
        assert entry.run(stage, args) == 2
        one_line_error(capsys, f"jobs/{stage}.py: error: {typo}: no option of", f"did you mean the job flag {meant}?")
    assert not ran
    assert entry.run("merge", ["--config", str(config), "--out", str(tmp_path / "o"), "--cpus-per-worker", "2"]) == 0
    assert ran and "--cpus-per-worker" in ran[0]


# ---- the KubeRay manifest check's --help -------------------------------------------------------

def test_the_manifest_check_help_says_what_manifests_are_and_where_crds_come_from(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m simmerge_ray.kuberay --help` gave `manifests` no help and said of --crds only
    "folder with the KubeRay CRD YAML files", not where a user gets them."""
    from simmerge_ray import kuberay

    with pytest.raises(SystemExit) as e:
        kuberay.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "manifests the RayJob, RayCluster and RayService manifest files" in text, text
    assert "KubeRay v1 CRD" in text and "Helm chart's crds/ folder" in text and "config/crd/bases" in text, text


# ---- report.md's testbed table -----------------------------------------------------------------

def test_the_testbed_table_left_aligns_its_text_columns() -> None:
    """The column "expert of" (a domain's name, or -) was right-aligned like the accuracies."""
    from simmerge_ray.pipeline.report import render_markdown

    lines = render_markdown(_report(eval_examples=256, pairs=176)).splitlines()
    header = lines.index("| model | expert of | code | math | rag |")
    assert lines[header + 1] == "|---|---|---:|---:|---:|"
