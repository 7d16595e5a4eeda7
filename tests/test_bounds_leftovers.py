"""Bounds and leftovers: seeds bounded alike in every command, byte sizes that are positive and
never read `m` (milli in Kubernetes) as mega, entrypoint flags read by the commands' own parsers,
a failed staging claim that removes what it made, and a report whose files are replaced as a set.
No Ray."""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import pytest
import yaml
from input_checks import cli_status, one_line_error, tree_hash
from job_entry import load_entry

from simmerge_ray import job_entrypoint, kuberay, resources
from simmerge_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---- 1. --seed: 0 to 2**32 - 1 in every command ----------------------------------------------------

@pytest.mark.parametrize("command", [["merge", "m.yaml", "--out", "o"], ["label", "--catalog", "c.yaml", "--out", "o"]])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_merge_and_label_refuse_a_seed_the_other_commands_refuse(tmp_path, capsys, no_ray, monkeypatch, command, seed):
    monkeypatch.chdir(tmp_path)
    assert cli_status([*command, "--seed", seed]) == 2
    one_line_error(capsys, "--seed", f"{int(seed)} is not a seed from 0 to {2**32 - 1}")
    assert list(tmp_path.iterdir()) == []


# ---- 2. byte sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--shard-size", "-1G"], ["--shard-size=-1G"], ["--shard-size", "-5"]])
def test_a_negative_shard_size_names_the_option_and_says_positive(tmp_path, capsys, no_ray, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli_status(["merge", "m.yaml", "--out", "o", *argv]) == 2
    one_line_error(capsys, "--shard-size", "size must be positive", "-")
    assert list(tmp_path.iterdir()) == []


def test_a_lowercase_m_shard_size_is_refused_with_the_units_to_write(tmp_path, capsys, no_ray, monkeypatch):
    """`512m` was read as 512e6 bytes; in a Kubernetes quantity it is 0.512 bytes."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli_status(["merge", "m.yaml", "--out", "o", "--shard-size", "512m"]) == 2
    one_line_error(capsys, "--shard-size", "'512m'", "milli", "512M", "512Mi")


@pytest.mark.parametrize("text", ["512m", "1.5mB", " 2m "])
def test_parse_bytes_refuses_milli_everywhere(text):
    with pytest.raises(ConfigError, match=r"^SIMMERGE_MEMORY_PER_ACTOR: .* m is milli\); write .*M .*Mi"):
        resources.StageResources.from_env({"SIMMERGE_MEMORY_PER_ACTOR": text})


@pytest.mark.parametrize("text, expected", [("512M", 512 * 10**6), ("512Mi", 512 * 2**20), ("4k", 4000),
                                            ("2g", 2 * 10**9), ("+1K", 1000)])
def test_parse_bytes_still_reads_the_other_units(text, expected):
    assert resources.parse_bytes(text, what="x") == expected


def test_a_container_memory_limit_in_milli_is_a_problem_of_the_group():
    group = yaml.safe_load((REPO / "cluster" / "raycluster.yaml").read_text())["spec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "8000m"
    group.get("rayStartParams", {}).pop("memory", None)
    group.pop("resources", None)
    with pytest.raises(ConfigError, match=r"container memory limit: '8000m' is 8000 thousandths of a byte"):
        kuberay.group_capacity(group)


# ---- 3. entrypoint flags: the commands' own parsers --------------------------------------------------

@pytest.mark.parametrize("flags, culprit", [
    ("--num-cpu 2", "--num-cpu"),  # for --cpus-per-actor (a job flag) or the command's --cpus-per-worker
    ("--max-actor 4", "--max-actor"),  # the job's --max-actors: its parser takes no abbreviations
    ("--workers 0", "--workers: 0 is not at least 1"),
    ("--seed -3", "--seed: -3 is not a seed"),
    ("--cpus-per-actor", "--cpus-per-actor: expected one argument"),
])
def test_a_bad_flag_of_a_merge_entrypoint_is_named(flags, culprit):
    entrypoint = f"python jobs/merge.py --config m.yaml --out s3://b/m {flags}"
    with pytest.raises(ConfigError, match=r"^entrypoint ") as e:
        job_entrypoint.entrypoint_jobs(entrypoint)
    assert culprit in str(e.value) and len(str(e.value).splitlines()) == 1, e.value


def test_the_functional_step_of_features_gets_the_job_s_unknown_flags():
    assert job_entrypoint.entrypoint_jobs("python jobs/features.py --config c.yaml --out o --batch-size 4")
    with pytest.raises(ConfigError, match=r"simmerge features functional` .*--batch-sise 4"):
        job_entrypoint.entrypoint_jobs("python jobs/features.py --config c.yaml --out o --batch-sise 4")
    assert job_entrypoint.entrypoint_jobs("python jobs/fit.py --features f")  # options left out are not checked


@pytest.mark.parametrize("stage", ["fit", "plan"])
def test_a_config_given_to_a_job_that_takes_none_is_named_by_the_manifest_check(stage):
    """jobs/fit.py and jobs/plan.py refuse --config before any step (their commands take their
    inputs as flags); the manifest check says so too, not a job that fails on the cluster."""
    with pytest.raises(ConfigError, match=rf"^entrypoint .*jobs/{stage}.py would refuse it: --config: "
                                          rf"`simmerge {stage}` takes no config file") as e:
        job_entrypoint.entrypoint_jobs(f"python jobs/{stage}.py --config s3://b/c.yaml --out s3://b/o")
    assert len(str(e.value).splitlines()) == 1


def test_the_manifest_check_reports_a_misspelt_resource_flag(tmp_path, crd_dir, capsys):
    doc = yaml.safe_load((REPO / "cluster" / "rayjob-merge.yaml").read_text())
    doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace("--cpus-per-actor", "--num-cpus")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = tree_hash(tmp_path)
    assert kuberay.main([str(path), "--crds", str(crd_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"{path}: entrypoint ") and "unrecognized arguments: --num-cpus 2" in out[0]
    assert tree_hash(tmp_path) == before


# ---- 4. a failed staging claim ------------------------------------------------------------------------

def test_a_failed_staging_claim_removes_the_folders_it_created(tmp_path, monkeypatch):
    entry = load_entry()
    (tmp_path / "keep").mkdir()
    staging = tmp_path / "keep" / "a" / "b" / "simmerge-merge-0123"
    write_text = pathlib.Path.write_text

    def full(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == entry.STAGING_MARKER:
            write_text(self, "{\"sta")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(entry.storage.StorageError, match="No space left on device"):
        entry.claim_staging(staging, "merge", "s3://b/m")
    assert [p.name for p in tmp_path.rglob("*")] == ["keep"]  # what was there stays; nothing made is left


def test_a_failed_claim_of_an_existing_folder_keeps_the_folder(tmp_path, monkeypatch):
    entry = load_entry()
    staging = tmp_path / "simmerge-merge-0123"
    staging.mkdir()
    monkeypatch.setattr(pathlib.Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(entry.storage.StorageError):
        entry.claim_staging(staging, "merge", "s3://b/m")
    assert staging.is_dir() and list(staging.iterdir()) == []


# ---- 5. the run's report: every file atomic, replaced as a set ----------------------------------------

def _run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> Path:
    """A run folder with the stage outputs the report copies, the report's pieces stubbed."""
    import simmerge_ray.selector.data as selector_data
    from simmerge_ray.pipeline import report

    out = tmp_path / "run"
    for sub, name in (("selector_eval", "utility.png"), ("bandit", "regret.png")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / name).write_text(f"{name} {version}")

    monkeypatch.setattr(report, "build_report", lambda out, timings: {"multiway": {}, "version": version})
    monkeypatch.setattr(report, "render_markdown", lambda rep: f"# report {rep['version']}\n")
    monkeypatch.setattr(report, "grouped_bars", lambda values, path, *a: path.write_text(f"bars {version}"))
    monkeypatch.setattr(report, "feature_utility_heatmap", lambda *a: a[-1].write_text(f"heatmap {version}"))
    monkeypatch.setattr(selector_data, "load_pair_data",
                        lambda *a: type("D", (), {"x": 0, "y": 0, "feature_names": [], "operators": []}))
    return out


def test_an_interrupted_report_leaves_the_old_report_whole(tmp_path, monkeypatch):
    """report.json was replaced before the charts were drawn and report.md last: an interruption
    between them left a new report.json beside the old report.md."""
    from simmerge_ray.pipeline import report

    out = _run_folder(tmp_path, monkeypatch, "old")
    report.write_report(out, {})
    assert (out / "report.md").read_text() == "# report old\n"
    out = _run_folder(tmp_path, monkeypatch, "new")
    before = {k: v for k, v in tree_hash(out).items() if not k.startswith(("selector_eval", "bandit"))}

    def interrupted(*a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "feature_utility_heatmap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(out, {})
    after = {k: v for k, v in tree_hash(out).items() if not k.startswith(("selector_eval", "bandit"))}
    assert after == before  # the old set, whole; no temporary folder left
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".report")) == []


def test_a_report_rewritten_replaces_every_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import json

    from simmerge_ray.pipeline import report

    out = _run_folder(tmp_path, monkeypatch, "old")
    report.write_report(out, {})
    out = _run_folder(tmp_path, monkeypatch, "new")
    report.write_report(out, {})
    assert json.loads((out / "report.json").read_text())["version"] == "new"
    assert all("new" in (out / name).read_text() for name in report.REPORT_FILES), report.REPORT_FILES
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".stage-report.json"]
