"""Driver of tests/test_autoscaling.py, run as a process of its own so that the test process's
Ray (the session's `ray_cluster`) is never touched: an autoscaling Ray cluster on this machine
(Ray's autoscaler with its fake node provider, ../shared/RAY-TESTING.md) and the project's
stages on it.

    python tests/autoscaling_driver.py WORKDIR

The head runs no work (0 CPUs); one worker node type, `ray.worker.cpu` (1 CPU, min 0, max 3),
is launched by the autoscaler as local raylets when tasks or actors wait, and removed after
IDLE_S idle seconds. The head starts at once (while the test builds the inputs); once
WORKDIR/inputs.json appears the scenarios run in order on the one cluster:

1. unsatisfiable asks (a 2-CPU actor, a custom resource): must fail at once, named;
2. batch planning from 0 worker nodes, then the wait for 0 worker nodes again;
3. the structural pass, the label run, a merge;
4. the wait for 0 worker nodes.

A sampler thread records the number of alive worker nodes (and finished plan-batch requests)
every 0.25 s. Everything goes to WORKDIR/result.json; outputs to WORKDIR/as-*. The head's
process group id is appended to WORKDIR/pgids as soon as it starts; the driver kills the group
and every descendant (the fake nodes' raylets and workers) by id on the way out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from cluster_processes import connect, free_ports, kill_group  # beside this file: sys.path[0] when run as a script

RAY = Path(sys.executable).parent / "ray"
WORKER_TYPE = "ray.worker.cpu"
MAX_WORKERS = 3
IDLE_S = 10  # the autoscaler's idle timeout: short for the test, long enough that a node is not ended while it starts
RELEASE_TIMEOUT_S = 60  # how long the driver waits for the cluster to go back to 0 workers


def autoscaling_config(gcs_port: int) -> dict:
    """Ray's fake multi-node autoscaler config: a 0-CPU head, one 1-CPU worker type (0..3)."""
    return {
        "cluster_name": "simmerge-autoscaling-test", "max_workers": MAX_WORKERS,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_launch_config_check": True, "disable_node_updaters": True,
                     "foreground_node_launch": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default", "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_S / 60,
        "docker": {}, "head_node": {}, "worker_nodes": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class Head:
    """`ray start --head --block` with the autoscaler, in a session (process group) of its own."""

    def __init__(self, work: Path, env: dict[str, str], gcs_port: int) -> None:
        config = work / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(gcs_port)))
        self.config = config
        cmd = [str(RAY), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=0",
               f"--autoscaling-config={config}", f"--temp-dir={work / 't'}", "--include-dashboard=false",
               "--node-ip-address=127.0.0.1", "--object-store-memory=100000000", "--disable-usage-stats"]
        self.log = open(work / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        with open(work / "pgids", "a") as f:
            f.write(f"{self.proc.pid}\n")

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {self.proc.returncode}; see {self.log.name}")

    def kill(self) -> None:
        """SIGKILL the group, then every descendant (fake nodes' raylets, workers), by PID."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        kill_group(self.proc.pid, procs)
        self.proc.wait(timeout=30)
        self.log.close()


class Sampler(threading.Thread):
    """Alive worker nodes (and plan-batch answers in the results cache) every `period` s."""

    def __init__(self, t0: float, cache: Path | None = None, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.t0, self.cache, self.period = t0, cache, period
        self.timeline: list[tuple[float, int]] = []  # (s since t0, alive worker nodes)
        self.first_answer: float | None = None
        self.stop = threading.Event()

    def workers(self) -> int:
        import ray

        return sum(n["Alive"] for n in ray.nodes()) - 1  # the head runs no work

    def sample(self) -> None:
        n, t = self.workers(), time.perf_counter() - self.t0
        if not self.timeline or self.timeline[-1][1] != n:
            self.timeline.append((round(t, 2), n))
        if self.first_answer is None and self.cache is not None and any(self.cache.glob("*/row.json")):
            self.first_answer = round(t, 2)

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.sample()
        self.sample()  # the state when stopped: wait_for may have seen a change the loop had not yet

    def wait_for(self, n: int, timeout: float) -> float | None:
        """Seconds since t0 when the cluster had `n` workers, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers() == n:
                return round(time.perf_counter() - self.t0, 2)
            time.sleep(0.25)
        return None

    def max_between(self, a: float, b: float) -> int:
        before = [n for t, n in self.timeline if t <= a]
        inside = [n for t, n in self.timeline if a < t <= b]
        return max(before[-1:] + inside, default=0)


def actor_asks() -> dict[str, dict]:
    """Per actor class of this cluster: the resources each actor required and the nodes it ran on
    (read from the GCS actor table)."""
    import ray
    from ray.core.generated import gcs_pb2

    out: dict[str, dict] = {}
    for raw in ray._private.state.state._connect_and_get_accessor().get_actor_table(None, None):
        a = gcs_pb2.ActorTableData.FromString(raw)
        entry = out.setdefault(a.class_name, {"asks": [], "nodes": []})
        ask = dict(sorted(a.required_resources.items()))
        if ask not in entry["asks"]:
            entry["asks"].append(ask)
        node = a.address.node_id.hex()
        if node and node not in entry["nodes"]:
            entry["nodes"].append(node)
    return out


def fails_fast(fn) -> dict:
    """Run `fn`, expecting UnsatisfiableAsk: its type, message and seconds."""
    t = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded; the test asserts the type and message
        return {"error": type(e).__name__, "message": str(e), "seconds": round(time.perf_counter() - t, 2)}
    return {"error": None, "message": None, "seconds": round(time.perf_counter() - t, 2)}


def scenarios(work: Path, inputs: dict, sampler: Sampler, result: dict, config: Path) -> None:
    from simmerge_ray.catalog import Catalog
    from simmerge_ray.features.structural import StructuralOptions, compute_structural
    from simmerge_ray.merge.config import MergeSpec
    from simmerge_ray.merge.executor import ExecOptions, run_merge
    from simmerge_ray.placement import NODE_TYPES_ENV
    from simmerge_ray.planner.batch import BatchSettings, run_batch
    from simmerge_ray.testbed.label_plans import LabelSettings
    from simmerge_ray.testbed.labels import run_labels

    def mark(name: str) -> float:
        t = round(time.perf_counter() - sampler.t0, 2)
        result["marks"][name] = t
        write(work, result)
        return t

    # The autoscaler's own config declares the node types it can launch (Ray's v1 autoscaler
    # does not report them to the GCS).
    os.environ[NODE_TYPES_ENV] = str(config)
    batch = BatchSettings(requests=inputs["requests"], selector=inputs["selector"], catalog=inputs["catalog"],
                          features=inputs["features"], out=str(work / "as-plans"), actors=MAX_WORKERS,
                          rows_per_block=2)

    # 1. Asks no node type offers, from 0 worker nodes: named errors at once, nothing launched.
    mark("unsatisfiable_start")
    os.environ["SIMMERGE_CPUS_PER_ACTOR"] = "2"
    result["unsatisfiable"] = {"plan_batch_2cpu": fails_fast(
        lambda: run_batch(BatchSettings(**{**batch.__dict__, "out": str(work / "as-bad")})))}
    os.environ["SIMMERGE_CPUS_PER_ACTOR"] = "1"
    spec = MergeSpec.load(inputs["merge_config"])
    result["unsatisfiable"]["merge_custom_resource"] = fails_fast(
        lambda: run_merge(spec, work / "as-bad-merge", ExecOptions(placement="ray", workers=2, resources={"nvme": 1})))
    mark("unsatisfiable_end")

    # 2. Batch planning from 0 worker nodes; then back to 0.
    t = mark("plan_batch_start")
    report = run_batch(batch)
    t_end = mark("plan_batch_end")
    result["plan_batch"] = {"requests": report.requests, "ok": report.ok, "errors": report.errors,
                            "seconds": round(report.seconds, 2), "first_answer_s": sampler.first_answer,
                            "max_workers": sampler.max_between(t, t_end)}
    result["plan_batch"]["released_s"] = sampler.wait_for(0, RELEASE_TIMEOUT_S)
    mark("plan_batch_released")

    # 3. The structural pass, the label run and a merge, one after another.
    t = mark("structural_start")
    run = compute_structural(Catalog.load(inputs["catalog"]), work / "as-features",
                             StructuralOptions(workers=MAX_WORKERS, use_cache=False))
    result["structural"] = {"seconds": round(run.seconds, 2),
                            "max_workers": sampler.max_between(t, mark("structural_end"))}
    t = mark("label_start")
    settings = LabelSettings(**inputs["label_settings"])
    rep = run_labels(Path(inputs["label_catalog"]), work / "as-labels", settings, log=lambda *_: None)
    result["label"] = {"complete": rep.complete, "computed": rep.computed, "seconds": round(rep.seconds, 2),
                       "max_workers": sampler.max_between(t, mark("label_end"))}
    t = mark("merge_start")
    merged = run_merge(spec, work / "as-merged", ExecOptions(placement="ray", workers=2))
    result["merge"] = {"shards": merged.shards, "seconds": round(merged.seconds, 2),
                       "max_workers": sampler.max_between(t, mark("merge_end"))}

    result["actors"] = actor_asks()

    # 4. Idle again: every worker node released.
    result["released_s"] = sampler.wait_for(0, RELEASE_TIMEOUT_S)
    mark("released")


def write(work: Path, result: dict) -> None:
    tmp = work / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(work / "result.json")


def main(work: Path) -> int:
    import ray

    t0 = time.perf_counter()
    result: dict = {"marks": {}, "idle_timeout_s": IDLE_S, "max_workers_allowed": MAX_WORKERS}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1", "SIMMERGE_CACHE": str(work / "cache")})
    os.environ.update({k: v for k, v in env.items() if k not in ("RAY_FAKE_CLUSTER",)})
    os.environ["SIMMERGE_CPUS_PER_ACTOR"] = os.environ["SIMMERGE_CPUS_PER_INFERENCE_ACTOR"] = "1"
    head: Head | None = None
    sampler: Sampler | None = None
    try:
        (gcs,) = free_ports(1)
        head = Head(work, env, gcs)
        deadline = time.monotonic() + 120
        connect(gcs, head.check, 120)
        result["head_up_s"] = round(time.perf_counter() - t0, 2)
        while not (work / "inputs.json").exists():  # the test builds them meanwhile
            head.check()
            if time.monotonic() > deadline + 300:
                raise RuntimeError("inputs.json never appeared")
            time.sleep(0.2)
        inputs = json.loads((work / "inputs.json").read_text())
        result["inputs_ready_s"] = round(time.perf_counter() - t0, 2)
        sampler = Sampler(t0, cache=work / "as-plans" / "cache")
        sampler.start()
        scenarios(work, inputs, sampler, result, head.config)
    except BaseException as e:  # recorded for the test, which fails on it
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join(timeout=5)
            result["timeline"] = sampler.timeline
        ray.shutdown()
        if head is not None:
            head.kill()
        result["total_s"] = round(time.perf_counter() - t0, 2)
        write(work, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
