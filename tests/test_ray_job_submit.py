"""jobs/ entry points under `ray job submit` on the session's real Ray head (conftest.py), and in-process checks
of what the shared entry code does before Ray is involved."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from cluster_processes import RayHead

from simmerge_ray import resources
from simmerge_ray.errors import SimMergeError
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.arms import ARM_NAMES, PAPER_ARMS
from job_entry import load_entry  # beside this file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("job-inputs")
    spec = dict(architecture="llama", hidden_size=32, num_layers=2, num_heads=2, vocab_size=64)
    make_checkpoint(root / "a", SyntheticSpec(**spec, seed=1))
    make_checkpoint(root / "b", SyntheticSpec(**spec, seed=2))
    (root / "linear.yaml").write_text(
        f"merge_method: linear\nmodels:\n"
        f"  - model: {root / 'a'}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {root / 'b'}\n    parameters: {{weight: 0.75}}\n"
        f"dtype: float32\n")
    (root / "bad.yaml").write_text(
        f"merge_methd: linear\nmodels:\n  - model: {root / 'a'}\n  - model: {root / 'b'}\n")
    return root


@pytest.mark.slow
def test_merge_job_succeeds_and_bad_config_fails(ray_head: RayHead, merge_inputs: Path, tmp_path: Path) -> None:
    """Two jobs at once on the 2-CPU head: a merge to a file:// URI, and one with a misspelt key."""
    out_uri = f"file://{tmp_path}/merged"
    ray_head.submit("merge-ok", "jobs/merge.py", "--config", str(merge_inputs / "linear.yaml"),
                    "--out", out_uri, "--cpus-per-actor", "0.5", "--max-actors", "1")
    ray_head.submit("merge-bad", "jobs/merge.py", "--config", str(merge_inputs / "bad.yaml"),
                    "--out", str(tmp_path / "never"))

    assert ray_head.wait("merge-ok") == "SUCCEEDED", ray_head.logs("merge-ok")
    logs = ray_head.logs("merge-ok")
    # The asks reached the merge command: the CPU ask as its flag, the --max-actors cap as the variable.
    (line,) = [x for x in logs.splitlines() if x.startswith("jobs/merge.py: SIMMERGE_")]
    assert "SIMMERGE_CPUS_PER_ACTOR=0.5 " in line and " SIMMERGE_MAX_ACTORS=1 simmerge merge " in line, line
    assert "--cpus-per-worker 0.5" in logs
    merged = Checkpoint.open(tmp_path / "merged")
    a, b = Checkpoint.open(merge_inputs / "a"), Checkpoint.open(merge_inputs / "b")
    assert set(merged.entries) == set(a.entries)
    for name in a.entries:
        want = 0.25 * a.read_f32(name) + 0.75 * b.read_f32(name)
        assert (merged.read_f32(name) - want).abs().max().item() < 1e-6, name
    manifest = json.loads((tmp_path / "merged" / "_SUCCESS").read_text())
    assert manifest["files"]["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").stat().st_size
    assert f"uploaded {len(manifest['files'])} files" in logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp prefix left behind

    assert ray_head.wait("merge-bad") == "FAILED"
    bad_logs = ray_head.logs("merge-bad")
    assert "merge_methd" in bad_logs and "error" in bad_logs
    assert not (tmp_path / "never").exists()


REPORT_KEYS = (
    [f"pairwise.utility.{m}.mean" for m in ("simmerge", *ARM_NAMES, "majority", "oracle")]
    + [f"pairwise.gap_closed.{m}.mean" for m in ("simmerge", *PAPER_ARMS, "oracle")]
    + ["pairwise.selection_accuracy"]
    + [f"multiway.{k}way.{m}.{r}" for k in (3, 4) for r in ("expert_retention", "mean_retention")
       for m in ("simmerge", "random_order", "linear", "slerp", "ties", "equal_share", "oracle")]
    + [f"bandit.regret.{p}.{r}" for p in ("bandit", "bandit_cold", "random", "greedy") for r in (60, 200)]
    + [f"timings.{s}" for s in ("zoo", "structural", "functional", "labels", "selector_eval", "fit",
                                 "multiway", "bandit")]
)


def _not_json(name: str) -> None:
    raise AssertionError(f"report.json holds {name}, which is not JSON")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.slow
def test_whole_pipeline_job_on_the_tiny_testbed(ray_head: RayHead, tmp_path: Path) -> None:
    """`ray job submit -- python jobs/pipeline.py` on the tiny zoo: every stage, then the report."""
    out = tmp_path / "run"
    ray_head.submit("pipeline", "jobs/pipeline.py", "--config", str(REPO / "configs" / "zoo_tiny.yaml"),
                    "--out", str(out), "--quick")
    assert ray_head.wait("pipeline", timeout=1500) == "SUCCEEDED", ray_head.logs("pipeline")[-3000:]
    report = json.loads((out / "report.json").read_text(), parse_constant=_not_json)  # strict JSON: no NaN
    for key in REPORT_KEYS:
        value = _get(report, key)
        assert isinstance(value, float) and value == value and abs(value) != float("inf"), key
    g = report["pairwise"]["utility"]
    # the oracle is the best arm per pair: nothing beats it, on any task
    for task, best in g["oracle"].items():
        assert all(g[m][task] <= best + 1e-9 for m in ("simmerge", *ARM_NAMES)), task
    # every model of the testbed, the base included, with accuracy and score on every domain
    scores = report["testbed"]["scores"]
    assert scores["base"]["expert_of"] is None and scores["code-a"]["expert_of"] == "code"
    assert all(0 <= scores[m][d]["accuracy"] <= 1 for m in scores for d in ("code", "math", "rag"))
    assert report["metric"]["utilities_on"] == "accuracy"
    for chart in ("utility.png", "multiway_retention.png", "multiway_by_task.png", "regret.png",
                  "feature_utility_heatmap.png"):
        assert (out / chart).read_bytes()[:4] == b"\x89PNG", chart
    md = (out / "report.md").read_text()
    assert "## Multi-way plans" in md and "| simmerge |" in md
    lo = report["pairwise"]["leave_one_task_out"]  # three tasks: held out in turn, or the reason why not
    assert (f"leave one task out: {lo['selection_accuracy']:.1%}" if "selection_accuracy" in lo else lo["reason"]) in md
    assert "[8/8] bandit" in ray_head.logs("pipeline")
    # `simmerge calibrate` on the run's selectors, features and labels writes what its multi-way
    # stage wrote, byte for byte: a user's catalog gets the same judgement and calibration.
    from simmerge_ray.cli import main as cli_main

    assert cli_main(["calibrate", "--selector", str(out / "selector"), "--aux-selector", str(out / "selector_aux"),
                     "--features", str(out / "features"), "--labels", str(out / "labels"),
                     "--catalog", str(out / "zoo" / "catalog.yaml"), "--out", str(tmp_path / "calibrate")]) == 0
    for name in ("multiway.json", "calibration.json"):
        assert (tmp_path / "calibrate" / name).read_bytes() == (out / "multiway" / name).read_bytes(), name

    # The fitted selector applied, unchanged, as a transfer job into a copy of the run (transfer
    # refuses the selector's own run folder, whose labels it would replace): finished stages are
    # reused, the pairwise labels come from the label cache, and the report compares it with the oracle.
    target = tmp_path / "transfer-run"
    shutil.copytree(out, target)  # times kept: the stage markers see their outputs unchanged
    ray_head.submit("transfer", "jobs/transfer.py", "--config", str(REPO / "configs" / "zoo_tiny.yaml"),
                    "--out", str(target), "--selector", str(out / "selector"), "--no-reference")
    assert ray_head.wait("transfer", timeout=600) == "SUCCEEDED", ray_head.logs("transfer")[-3000:]
    logs = ray_head.logs("transfer")
    # zoo and features reused; labels run again with its own settings (2-way only), from the cache
    assert "[1/4] zoo" in logs and logs.count("done earlier") == 3 and "SimMerge (transferred)" in logs
    t = json.loads((target / "transfer" / "transfer.json").read_text())["transfer"]
    assert t["n"] == report["pairwise"]["pairs"] and 0 <= t["selection_accuracy"] <= 1
    # Its own training pairs: only those above the training rows' 99th percentile of max |z| are
    # flagged, which (interpolated over n rows) is at most ceil(0.01 (n - 1)) of them.
    assert "outside the selector's training domain" in logs
    dom = t["outside_training_domain"]
    assert dom["rows"] == t["n"] and dom["outside"] <= math.ceil(0.01 * (t["n"] - 1))
    for task, best in t["utility"]["oracle"].items():
        assert t["utility"]["simmerge"][task] <= best + 1e-9, task


# ---- the shared entry code, in-process (no Ray needed before these fail) ------------------------

def test_pipeline_refuses_an_unknown_stage_before_writing(tmp_path: Path) -> None:
    from simmerge_ray.pipeline import PipelineSettings, run

    settings = PipelineSettings(REPO / "configs" / "zoo_tiny.yaml", tmp_path / "run")
    with pytest.raises(SimMergeError, match=r"no pipeline stage 'label'; stages: zoo, structural, functional, labels,"):
        run(settings, until="label")
    assert not (tmp_path / "run").exists()


def test_stage_not_in_this_version_exits_with_a_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from simmerge_ray.job_stages import Stage, Step

    entry = load_entry()
    monkeypatch.setitem(entry.STAGES, "someday", Stage((Step(("someday",), "someday"),)))
    assert entry.run("someday", ["--config", "x.yaml"]) == entry.NOT_AVAILABLE
    err = capsys.readouterr().err
    assert "stage 'someday' is not available" in err and "simmerge_ray/cli/someday.py does not exist" in err


def test_bad_resource_flag_fails_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    entry = load_entry()
    assert entry.run("merge", ["--config", "x.yaml", "--out", str(tmp_path / "o"),
                               "--gpus-per-inference-actor", "1.5"]) == 2
    assert "--gpus-per-inference-actor" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_job_without_a_config_file_refuses_one(capsys: pytest.CaptureFixture[str]) -> None:
    """fit takes its inputs as flags (--features, --labels); a --config used to be dropped silently,
    and the command then failed on its missing flags."""
    entry = load_entry()
    assert entry.run("fit", ["--config", "/data/configs/fit.yaml", "--out", "/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jobs/fit.py: error: --config: `simmerge fit` takes no config file; give its inputs as its own "
                   "flags (see `simmerge fit --help`)")


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_an_output_bound_for_a_uri_is_staged_where_a_rerun_finds_it(merge_inputs: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A failed job keeps its staging folder (named by stage and URI) for the same command to pick
    up, as a local --out keeps label's cache and the pipeline's stages, unless it holds no work; a
    second job writing the same output at once is refused; a finished upload removes the folder."""
    import subprocess

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the merge runs in the command's own process
    entry = load_entry()
    uri, stage_dir = f"file://{tmp_path}/merged", tmp_path / "staging"
    staging = entry.staging_folder("merge", uri, str(stage_dir))
    config = tmp_path / "merge.yaml"
    config.write_text((merge_inputs / "bad.yaml").read_text())
    argv = ["--config", str(config), "--out", uri, "--staging-dir", str(stage_dir)]
    # Refused before any step wrote: nothing to resume, so nothing is kept or promised, and the
    # --staging-dir the job made for it is gone too.
    assert entry.run("merge", argv) != 0
    assert "kept the unfinished work" not in capsys.readouterr().err
    assert not staging.exists() and not stage_dir.exists()
    # Work an earlier run left (here a stand-in file under the staging output) is kept for the next.
    entry.claim_staging(staging, "merge", uri)
    (staging / "out").mkdir()
    (staging / "out" / "partial").write_text("an earlier run's work")
    assert entry.run("merge", argv) != 0
    assert f"kept the unfinished work at {staging}; the same command picks it up" in capsys.readouterr().err
    assert (staging / "out" / "partial").read_text() == "an earlier run's work"
    assert staging.is_dir() and not (tmp_path / "merged").exists()
    assert json.loads((staging / entry.STAGING_MARKER).read_text()) == {"stage": "merge", "out": uri}

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(staging / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert entry.run("merge", argv) == 2
        assert f"{uri}: another job is writing this output now" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()

    shutil.rmtree(staging / "out")  # the stand-in is no merge's output: merge would not write over it
    config.write_text((merge_inputs / "linear.yaml").read_text())
    assert entry.run("merge", argv) == 0
    assert (tmp_path / "merged" / "_SUCCESS").is_file() and not staging.exists()
    assert sorted(p.name for p in stage_dir.iterdir()) == []
    # A folder of the staging folder's name that the job did not make is refused and left alone
    # (the job writes into its staging folder and removes it whole).
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    assert entry.run("merge", [*argv, "--overwrite"]) == 2
    assert f"{staging}: exists and is not this job's staging folder for {uri}" in capsys.readouterr().err
    assert [p.name for p in staging.iterdir()] == ["notes.txt"]


def test_command_lines_built_for_the_stages() -> None:
    entry = load_entry()
    args, extra = entry.build_parser("merge").parse_known_args(
        ["--config", "m.yaml", "--out", "/o", "--overwrite", "--cpus-per-actor", "2", "--max-actors", "3",
         "--shard-size", "1G", "--workers", "5"])
    asks = resources.resources_from_flags(args, {})
    (merge,) = entry.STAGES["merge"].steps
    # positional config, the output, overwrite, the derived CPU ask; the user's --workers wins.
    assert entry.command_argv(merge, args, extra, "/o", asks, "m.yaml") == [
        "merge", "m.yaml", "--out", "/o", "--overwrite", "--cpus-per-worker", "2.0",
        "--shard-size", "1G", "--workers", "5"]
    args, extra = entry.build_parser("features").parse_known_args(
        ["--config", "cat.yaml", "--out", "/f", "--overwrite", "--batch-size", "4"])
    structural, functional = entry.STAGES["features"].steps
    assert entry.command_argv(structural, args, extra, "/f", asks, "cat.yaml") == [
        "features", "structural", "--catalog", "cat.yaml", "--out", "/f", "--overwrite"]
    assert entry.command_argv(functional, args, extra, "/f", asks, "cat.yaml") == [
        "features", "functional", "--catalog", "cat.yaml", "--out", "/f", "--batch-size", "4"]
    # --max-actors is a cap that reaches label (and merge) as SIMMERGE_MAX_ACTORS, not as their firm
    # --workers N (refused where the cluster can never hold N).
    args, extra = entry.build_parser("label").parse_known_args(["--config", "cat.yaml", "--out", "/l", "--max-actors", "4"])
    (label,) = entry.STAGES["label"].steps
    asks = resources.resources_from_flags(args, {})
    assert entry.command_argv(label, args, extra, "/l", asks, "cat.yaml") == ["label", "--catalog", "cat.yaml", "--out", "/l"]
    env: dict[str, str] = {}
    resources.export(asks, env)
    assert env["SIMMERGE_MAX_ACTORS"] == "4"


def test_every_stage_has_its_job_script() -> None:
    entry = load_entry()
    assert set(entry.STAGES) == {"zoo_build", "probe", "features", "label", "fit", "plan", "plan_batch", "merge", "serve",
                                 "pipeline", "transfer"}
    assert set(resources.STAGE_ROLES) == set(entry.STAGES)  # the manifest checks know every stage
    for stage in entry.STAGES:
        assert f'main("{stage}")' in (REPO / "jobs" / f"{stage}.py").read_text()
