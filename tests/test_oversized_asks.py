"""Counts and asks a user sets that the session's fixed 4-CPU cluster can never hold: each is one
line naming the flag or variable and the most the cluster holds, before any actor starts (each
of these waited forever, printing nothing: an actor pool whose every actor is handed work, or
Ray Data's probe pool, which only warns in the logs that it "may hang forever"). A default
count that a memory ask makes too large is cut to what fits instead."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.synthetic_lm import make_corpus, make_tiny_lm, train_tokenizer
from simmerge_ray import placement
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint, make_family
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.placement import UnsatisfiableAsk
from simmerge_ray.resources import SizeFrom
from input_checks import cli_status, one_line_error  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64)


@pytest.fixture(autouse=True)
def _fixed_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the session cluster's own nodes (none declared), and the asks' defaults."""
    for var in (placement.NODE_TYPES_ENV, "SIMMERGE_MAX_ACTORS", "SIMMERGE_CPUS_PER_ACTOR", "SIMMERGE_MEMORY_PER_ACTOR",
                "SIMMERGE_CPUS_PER_INFERENCE_ACTOR", "SIMMERGE_GPUS_PER_INFERENCE_ACTOR",
                "SIMMERGE_MEMORY_PER_INFERENCE_ACTOR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and three variants (structural features), and a catalog of tiny LMs with probes
    and eval files (probe, label)."""
    root = tmp_path_factory.mktemp("oversized")
    make_checkpoint(root / "base", SPEC)
    for i in range(3):
        make_checkpoint(root / f"ft{i}", SyntheticSpec(**{**SPEC.__dict__, "seed": 10 + i}), base=root / "base",
                        delta_std=0.01)
    (root / "structural.yaml").write_text("base: base\nmodels:\n" + "".join(
        f"  - {{name: ft{i}, path: ft{i}}}\n" for i in range(3)))
    tok = train_tokenizer(make_corpus(300, seed=1))
    make_tiny_lm(root / "lm-base", tok, seed=1)
    tasks = ("code", "math", "rag")
    for i, task in enumerate(tasks):
        make_tiny_lm(root / f"lm-{task}", tok, seed=1, base=root / "lm-base", delta_std=0.01 * (i + 1))
        lines = make_corpus(4, seed=5 + i, max_words=6)
        (root / f"{task}.probes.txt").write_text("\n".join(lines) + "\n")
        (root / f"{task}.eval.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": " a"}) + "\n" for p in lines))
    (root / "lm.yaml").write_text(yaml.safe_dump({
        "base": "lm-base",
        "models": [{"name": t, "path": f"lm-{t}", "task": t} for t in tasks],
        "tasks": {t: {"probes": f"{t}.probes.txt", "eval": f"{t}.eval.jsonl"} for t in tasks}}))
    return root


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    t = time.perf_counter()
    assert cli_status(argv) == 2
    assert time.perf_counter() - t < 30
    one_line_error(capsys, *needles)


def _pool_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "simmerge_ray.actor_pool"]


def test_structural_workers_beyond_the_cluster_fail_at_once(ray_cluster, zoo: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    argv = ["features", "structural", "--catalog", str(zoo / "structural.yaml"), "--no-cache"]
    _refused([*argv, "--out", str(tmp_path / "w8"), "--workers", "8"], capsys,
             "the structural actor pool (--workers 8): 8 workers of CPU=1 each must run at once, but this cluster "
             "holds at most 4", "ask for at most 4")
    assert not (tmp_path / "w8").exists()
    # SIMMERGE_MAX_ACTORS (a job's --max-actors) is a cap: cut to the 4 the cluster holds, and run.
    monkeypatch.setenv("SIMMERGE_MAX_ACTORS", "6")
    caplog.set_level(logging.WARNING, logger="simmerge_ray.actor_pool")
    assert cli_status([*argv, "--out", str(tmp_path / "env6")]) == 0
    assert (tmp_path / "env6" / "structural.parquet").is_file()
    assert _pool_warnings(caplog) == [
        "structural actor pool: 4 actors, the most this cluster can hold at once (SIMMERGE_MAX_ACTORS=6 asked for 6)"]


def test_a_memory_ask_lets_the_default_structural_pool_finish(ray_cluster, zoo: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMMERGE_MEMORY_PER_ACTOR", str(int(ray_cluster.cluster_resources()["memory"] * 0.6)))
    argv = ["features", "structural", "--catalog", str(zoo / "structural.yaml"), "--no-cache"]
    assert cli_status([*argv, "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "structural.parquet").is_file()


def test_the_default_label_pool_is_cut_where_the_cluster_holds_fewer(ray_cluster, zoo: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, capsys,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Label actors of 3 CPUs: the default 2 do not fit the 4-CPU cluster together; one runs."""
    monkeypatch.setenv("SIMMERGE_CPUS_PER_INFERENCE_ACTOR", "3")
    caplog.set_level(logging.WARNING, logger="simmerge_ray.actor_pool")
    assert cli_status(["label", "--catalog", str(zoo / "lm.yaml"), "--out", str(tmp_path / "labels"),
                       "--max-plans", "6"]) == 0
    assert "label: 6 measured, 0 cached of " in capsys.readouterr().out
    assert _pool_warnings(caplog) == [
        "label actor pool: 1 actors, the most this cluster can hold at once (the default asked for 2)"]


def test_a_merge_pool_beyond_the_cluster_fails_at_once(ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys, caplog: pytest.LogCaptureFixture) -> None:
    root = make_family(tmp_path / "models", SPEC)
    cfg = root / "ta.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base",
                                   "models": [{"model": "m1", "parameters": {"weight": 0.7}},
                                              {"model": "m2", "parameters": {"weight": 0.5}}]}))
    opts = ExecOptions(placement="ray", workers=8, unit_elems=700, workers_from=SizeFrom("--merge-workers"))
    with pytest.raises(UnsatisfiableAsk, match=r"^the merge worker pool \(--merge-workers\): 8 workers of CPU=1 "
                                               r"each must run at once, but this cluster holds at most 4 "):
        run_merge(MergeSpec.load(cfg), tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()
    # The same 8 as a default (no flag set them) is cut to the 4 the cluster holds, and merges.
    res = run_merge(MergeSpec.load(cfg), tmp_path / "ok", ExecOptions(placement="ray", workers=8, unit_elems=700))
    assert res.units > 4 and res.workers == 4
    # So is SIMMERGE_MAX_ACTORS, a cap (a job's --max-actors), as `simmerge merge` reads it; 8K
    # shards make more than 6 units (a unit never spans two files).
    monkeypatch.setenv("SIMMERGE_MAX_ACTORS", "6")
    caplog.set_level(logging.WARNING, logger="simmerge_ray.actor_pool")
    caplog.clear()  # the default's warning above
    assert cli_status(["merge", str(cfg), "--out", str(tmp_path / "capped"), "--ray", "--shard-size", "8K"]) == 0
    assert "input; 4 Ray actors)" in capsys.readouterr().out
    assert _pool_warnings(caplog) == [
        "merge worker pool: 4 actors, the most this cluster can hold at once (SIMMERGE_MAX_ACTORS=6 asked for 6)"]


def test_label_workers_beyond_the_cluster_fail_at_once(ray_cluster, zoo: Path, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    argv = ["label", "--catalog", str(zoo / "lm.yaml"), "--out", str(tmp_path / "labels"), "--max-plans", "20"]
    _refused([*argv, "--workers", "8"], capsys,
             "the label actor pool (--workers 8): ", "workers of CPU=1 each must run at once", "at most 4")
    assert not (tmp_path / "labels" / "labels.parquet").exists()
    # The same count as a cap (a job's --max-actors, which reaches label as SIMMERGE_MAX_ACTORS) runs on 4.
    monkeypatch.setenv("SIMMERGE_MAX_ACTORS", "8")
    caplog.set_level(logging.WARNING, logger="simmerge_ray.actor_pool")
    assert cli_status(argv) == 0
    assert "label: 20 measured, 0 cached of " in capsys.readouterr().out
    (warning,) = _pool_warnings(caplog)
    assert warning.startswith("label actor pool: 4 actors, the most this cluster can hold at once "
                              "(SIMMERGE_MAX_ACTORS=8 asked for "), warning


def test_a_gpu_probe_actor_on_a_cluster_without_gpus_fails_at_once(ray_cluster, zoo: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("SIMMERGE_GPUS_PER_INFERENCE_ACTOR", "1")
    _refused(["probe", "--catalog", str(zoo / "lm.yaml"), "--out", str(tmp_path / "p")], capsys,
             "a probe actor (SIMMERGE_CPUS_PER_INFERENCE_ACTOR, SIMMERGE_GPUS_PER_INFERENCE_ACTOR, "
             "SIMMERGE_MEMORY_PER_INFERENCE_ACTOR) asks for GPU=1", "(the most: 0;")
    # refused before any cache entry was written (it left a meta.json per model and task)
    assert not (tmp_path / "p" / "probe_cache").exists()
