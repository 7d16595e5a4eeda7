"""Issue 24, autoscaling proven on this machine: batch planning, the structural pass, the label run
and a merge on a cluster that starts with 0 worker nodes, grows while work waits and shrinks back
to 0 when idle; asks no node type offers fail at once, named.

The autoscaling cluster and its driver live in a process of their own (tests/autoscaling_driver.py),
so the session's Ray (conftest's `ray_cluster`, a fixed local cluster) is untouched: it builds the
inputs here and computes the reference results the autoscaling cluster's must equal. The driver
starts its head at once, while the inputs are built. Every process the driver starts is killed
by process group (and by PID) here too, however the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml

from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.planner.batch import BatchSettings, run_batch
from benchmarks.synthetic_world import build_world
from simmerge_ray.testbed.label_plans import LabelSettings
from simmerge_ray.testbed.labels import run_labels

from cluster_processes import digests, reap, stop_driver

DRIVER = Path(__file__).with_name("autoscaling_driver.py")
# A zoo of two one-layer experts trained for 2 steps: a label run in seconds.
MICRO_ZOO = {
    "seed": 0,
    "architecture": {"type": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                     "max_position_embeddings": 96},
    "tokenizer": {"vocab_size": 300, "sample_chars": 8000, "seed": 0},
    "data": {"seq_len": 32, "eval_examples": 8, "probe_prompts": 4, "seed": 0},
    "base": {"steps": 2, "lr": 0.004, "batch_size": 4, "warmup_steps": 1, "domain_share": 0.3, "seed": 1},
    "domains": {"code": {"variants": [{"name": "code-a", "steps": 2, "lr": 0.004, "seed": 11}]},
                "math": {"variants": [{"name": "math-a", "steps": 2, "lr": 0.004, "seed": 21}]}},
    "runtime": {"workers": 1},
}
# Likelihood scores with no gap threshold: two barely trained experts still give labels.
LABELS = {"subsets_3": 0, "subsets_4": 0, "mixed_4": 0, "workers": 2, "plans_per_call": 4, "metric": "score",
          "gap_epsilon": 0.0}
TASKS = ("code", "math", "rag", "chat")


def _requests(models: list[str]) -> list[dict]:
    """24 distinct requests over the 4-model world: every task, every size, with and without
    a required expert."""
    out = []
    for i, task in enumerate(TASKS * 6):
        expert = f"{task}-0"
        others = [m for m in models if m != expert]
        req = {"request_id": f"r{i:02d}", "task": task, "models": [expert, *others[: 1 + i % 3]],
               "max_way": 2 + (i // 4) % 3}
        if (i // 4) % 2:
            req["required_expert"] = expert
        out.append(req)
    return out


def _build_inputs(work: Path) -> tuple[dict, dict]:
    """The inputs (on the session's fixed cluster) and the reference results computed there."""
    from simmerge_ray.testbed.build import build_zoo
    from simmerge_ray.testbed.zoo_config import ZooConfig

    t = time.perf_counter()
    world = build_world(work / "world", n_models=4, epochs=10)  # its structural pass is the reference
    pl.DataFrame(_requests(world.models)).write_parquet(work / "requests.parquet")
    ck = work / "world" / "ckpt"
    merge_cfg = {"merge_method": "task_arithmetic", "base_model": str(ck / "base"), "dtype": "float32",
                 "models": [{"model": str(ck / m), "parameters": {"weight": w}}
                            for m, w in zip(world.models[:2], (0.6, 0.4))]}
    (work / "merge.yaml").write_text(yaml.safe_dump(merge_cfg))
    (work / "zoo.yaml").write_text(yaml.safe_dump(MICRO_ZOO))
    zoo = build_zoo(ZooConfig.load(work / "zoo.yaml"), work / "zoo", log=lambda *_: None)
    inputs = {"requests": str(work / "requests.parquet"), "selector": str(world.selector),
              "catalog": str(world.catalog), "features": str(world.features), "merge_config": str(work / "merge.yaml"),
              "label_catalog": str(zoo), "label_settings": LABELS}
    (work / ".inputs.json").write_text(json.dumps(inputs))
    (work / ".inputs.json").rename(work / "inputs.json")  # the driver starts on this
    timings = {"inputs_s": time.perf_counter() - t}

    t = time.perf_counter()
    run_batch(BatchSettings(requests=inputs["requests"], selector=inputs["selector"], catalog=inputs["catalog"],
                            features=inputs["features"], out=str(work / "ref-plans"), actors=2))
    run_labels(zoo, work / "ref-labels", LabelSettings(**LABELS), log=lambda *_: None)
    run_merge(MergeSpec.load(work / "merge.yaml"), work / "ref-merged", ExecOptions(workers=1))
    timings["reference_s"] = time.perf_counter() - t
    return inputs, timings


def _wait(proc: subprocess.Popen, work: Path, timeout: float) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    assert (work / "result.json").exists(), f"the driver wrote nothing; see {work}/driver.log"
    return json.loads((work / "result.json").read_text())


def _tails(work: Path) -> str:
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(work.glob("*.log"))]
    monitor = work / "t" / "session_latest" / "logs" / "monitor.log"
    if monitor.exists():
        parts.append(f"--- monitor.log\n{monitor.read_text(errors='replace')[-2000:]}")
    return "\n".join(parts)


@pytest.mark.autoscaling
def test_autoscaling_cluster_grows_answers_and_shrinks(ray_cluster) -> None:
    work = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))  # short: Ray's socket paths are limited
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DRIVER.parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    log = open(work / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(work)], env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    left: list[psutil.Process] = []
    try:
        inputs, timings = _build_inputs(work)
        result = _wait(proc, work, timeout=400)
        print(f"\nautoscaling: {json.dumps(result)}\ntest process: {timings}, total {time.monotonic() - t0:.1f} s")
        assert "error" not in result, f"{result['error']}\n{_tails(work)}"

        # Asks no node type offers fail at once, naming the resource; no node was launched for them.
        bad = result["unsatisfiable"]
        assert bad["plan_batch_2cpu"]["error"] == "UnsatisfiableAsk" and bad["plan_batch_2cpu"]["seconds"] < 60
        assert bad["plan_batch_2cpu"]["message"].startswith("plan-batch actor asks for CPU=2")
        assert "ray.worker.cpu" in bad["plan_batch_2cpu"]["message"] and "\n" not in bad["plan_batch_2cpu"]["message"]
        assert bad["merge_custom_resource"]["error"] == "UnsatisfiableAsk"
        assert bad["merge_custom_resource"]["message"].startswith("merge worker asks for nvme=1")
        assert bad["merge_custom_resource"]["seconds"] < 60
        timeline = [tuple(x) for x in result["timeline"]]
        marks = result["marks"]
        assert timeline[0][1] == 0  # the cluster started with 0 worker nodes
        assert max(n for t, n in timeline if t <= marks["plan_batch_start"]) == 0

        # Batch planning grew the cluster to 2+ worker nodes, answered every request, and the
        # nodes were released within the idle timeout (plus the autoscaler's update period).
        pb = result["plan_batch"]
        assert pb["requests"] == pb["ok"] == 24 and pb["errors"] == 0
        assert pb["max_workers"] >= 2, timeline
        assert pb["released_s"] is not None and pb["released_s"] - marks["plan_batch_end"] < 60
        ref = pl.read_parquet(work / "ref-plans" / "results.parquet")
        got = pl.read_parquet(work / "as-plans" / "results.parquet")
        cols = ["request_id", "status", "models", "operators", "score", "runner_up_models", "plans_scored"]
        assert got.select(cols).equals(ref.select(cols))

        # The structural pass, the label run and the merge equal the fixed cluster's results.
        for table in ("structural.parquet", "structural_layers.parquet"):
            a, b = pl.read_parquet(Path(inputs["features"]) / table), pl.read_parquet(work / "as-features" / table)
            assert a.height > 0 and a.equals(b), table
        assert (Path(inputs["features"]) / "gram.safetensors").read_bytes() == \
            (work / "as-features" / "gram.safetensors").read_bytes()
        assert result["structural"]["max_workers"] >= 2
        assert result["label"]["complete"] and result["label"]["computed"] > 0
        for table in ("labels.parquet", "model_scores.parquet"):
            a, b = pl.read_parquet(work / "ref-labels" / table), pl.read_parquet(work / "as-labels" / table)
            assert a.height > 0 and a.equals(b), table
        assert result["merge"]["shards"] >= 1
        assert digests(work / "as-merged") == digests(work / "ref-merged")

        # Every actor asked for what simmerge_ray.resources says (SIMMERGE_CPUS_PER_*ACTOR=1 in
        # the driver), on the nodes the autoscaler added; the pools created at once spread over
        # them. (Batch planning's pool grows one actor at a time: on a loaded machine the first
        # actor can answer every block before the next has started on its new node.)
        actors = result["actors"]
        for cls, min_nodes in (("MapWorker(MapBatches(PlanWorker))", 1), ("GramWorker", 2), ("PlanEvaluator", 1),
                               ("UnitMerger", 1)):
            # Ray Data may add its own memory estimate to map actors it starts after seeing
            # outputs ({"CPU": 1.0, "memory": 836.0} in one CI run); the CPU ask is ours.
            asks = actors[cls]["asks"]
            assert asks and all(a.get("CPU") == 1.0 and set(a) <= {"CPU", "memory"} for a in asks), (cls, actors[cls])
            assert len(actors[cls]["nodes"]) >= min_nodes, (cls, actors[cls])

        # Idle at the end: back to 0 worker nodes.
        assert result["released_s"] is not None and timeline[-1][1] == 0
    finally:
        stop_driver(proc, work)
        log.close()
        if (work / "result.json").exists():  # the story of a failed run too
            print(f"\nresult.json: {(work / 'result.json').read_text()}")
        left = reap(work)
    assert left == [], f"processes left behind: {[p.pid for p in left]}"
