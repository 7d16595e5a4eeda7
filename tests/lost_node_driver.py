"""Driver of tests/test_lost_node.py, run as a process of its own so that the test process's Ray
(the session's `ray_cluster`) is never touched: a two-node Ray cluster on this machine, a merge
and a structural pass spread over both nodes, the second node killed mid-run.

    python tests/lost_node_driver.py WORKDIR

Each node is a `ray start --block` in a session of its own, with its own temp folder under
WORKDIR, its own ports and the custom resources `merge_slot` and `gram_slot` (one each): the
merge's workers and the structural pass's actors ask for one slot each, so with two of each,
each pool has exactly one actor on each node. Both stages run twice: once undisturbed, together;
once with node 2 killed (its raylet and workers, SIGKILL by PID) while node 2 merges a unit (held
there until the kill, tests/merge_faults.py) and holds an actor of the structural pass; a third
node then joins, as a replaced pod would, and the restarted actors finish there. Outputs go to
WORKDIR/{ref,lost}-{merged,features}; WORKDIR/result.json records what ran where. Each node's
process group id is appended to WORKDIR/pgids as soon as it starts, so the test can kill them even
if this driver dies; this driver kills every group it started on the way out, whatever happened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from cluster_processes import connect, free_ports, kill_group  # beside this file: sys.path[0] when run as a script
from merge_faults import held_on
from simmerge_ray.catalog import Catalog
from simmerge_ray.features.structural import StructuralOptions, compute_structural
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.merge.unit_merger import UnitMerger

RAY = Path(sys.executable).parent / "ray"
SLOTS = {"merge_slot": 1, "gram_slot": 1}
# Small models cut in small work units and chunks: each actor makes many calls.
SPEC = SyntheticSpec(architecture="llama", hidden_size=128, num_layers=4, num_heads=4, vocab_size=4096,
                     max_shard_bytes=2**20)
MODELS = ("m1", "m2", "m3")
# The GCS declares a silent raylet dead after about 3 s instead of about 30 s.
HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
          "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "3"}


class Node:
    """One `ray start --block` of ours: its own session (process group), ports and temp folder."""

    def __init__(self, work: Path, name: str, env: dict[str, str], gcs_port: int, head: bool,
                 slots: dict[str, int] = SLOTS, attempt: int = 0) -> None:
        self.name = name
        self._again = (work, name, env, gcs_port, head, slots)  # what restarted() starts again
        folder = name if attempt == 0 else f"{name}-retry{attempt}"
        temp = work / folder
        temp.mkdir()
        # the head's GCS port is not bound yet while its own ports are picked: keep it out
        nm, om, agent, agent_grpc, env_agent, metrics, client = free_ports(7, exclude=(gcs_port,))
        self.port = nm  # how ray.nodes() names this node
        cmd = [str(RAY), "start", "--block", f"--temp-dir={temp}", "--num-cpus=2",
               f"--resources={json.dumps(slots)}", "--object-store-memory=100000000",
               "--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
        if head:
            cmd += ["--head", f"--port={gcs_port}", "--include-dashboard=false", f"--ray-client-server-port={client}"]
        else:
            cmd += [f"--address=127.0.0.1:{gcs_port}"]
        self.log = open(work / f"{folder}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT)
        self.pgid = self.proc.pid
        with open(work / "pgids", "a") as f:
            f.write(f"{self.pgid}\n")

    def check(self) -> None:
        """Fail at once, naming the log, when `ray start` gave up (e.g. a startup timeout)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start of {self.name} exited with {self.proc.returncode}; see {self.log.name}")

    def restarted(self, attempt: int) -> "Node":
        """The same node started again (a fresh temp folder and ports), after this one's `ray
        start` gave up; what is left of this one is killed first."""
        self.kill()
        return Node(*self._again, attempt=attempt)

    def processes(self) -> list[psutil.Process]:
        """`ray start` and its descendants: the raylet, and the workers it spawned (which run in
        sessions of their own, so outside this node's process group)."""
        try:
            root = psutil.Process(self.pgid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def workers(self) -> dict[int, str]:
        """PID -> title of this node's Ray workers, e.g. 'ray::UnitMerger.run' while one merges a unit."""
        out = {}
        for p in self.processes():
            try:
                title = " ".join(p.cmdline()).strip()
            except psutil.Error:
                continue
            if title.startswith("ray::"):
                out[p.pid] = title.split()[0].rstrip("()")
        return out

    def titles(self) -> set[str]:
        return set(self.workers().values())

    def kill(self) -> None:
        """SIGKILL the node's process group, then any worker of it still alive, by PID."""
        workers = self.processes()[1:]
        kill_group(self.pgid, workers)
        self.proc.wait(timeout=30)
        self.log.close()


def make_inputs(work: Path) -> tuple[MergeSpec, Catalog]:
    make_checkpoint(work / "base", SPEC)
    for i, name in enumerate(MODELS, 1):
        make_checkpoint(work / name, dataclasses.replace(SPEC, seed=i), base=work / "base", delta_std=0.01)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(work / "base"), "dtype": "bfloat16",
           "models": [{"model": str(work / m), "parameters": {"weight": w}} for m, w in zip(MODELS, (0.5, 0.3, 0.2))]}
    (work / "merge.yaml").write_text(yaml.safe_dump(cfg))
    lines = [f"base: {work / 'base'}", "models:", *[f"  - {{name: {m}, path: {work / m}}}" for m in MODELS]]
    (work / "catalog.yaml").write_text("\n".join(lines) + "\n")
    return MergeSpec.load(work / "merge.yaml"), Catalog.load(work / "catalog.yaml")


class Stage:
    """One stage run in a thread of this driver; its error, if any, is kept for result.json."""

    def __init__(self, fn, *args) -> None:
        self.error: str | None = None
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args))
        self.thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self.result = fn(*args)
        except BaseException as e:  # reported in result.json; the test fails on it
            self.error = f"{type(e).__name__}: {e}"


def merge(work: Path, tag: str, spec: MergeSpec, worker_cls: type[UnitMerger] = UnitMerger) -> Stage:
    opts = ExecOptions(placement="ray", workers=2, resources={"merge_slot": 1}, shard_bytes=2**20, unit_elems=1 << 14,
                       worker_cls=worker_cls)
    return Stage(run_merge, spec, work / f"{tag}-merged", opts)


def structural(work: Path, tag: str, catalog: Catalog, workers: int) -> Stage:
    opts = StructuralOptions(workers=workers, resources={"gram_slot": 1}, use_cache=False, chunk_elems=1 << 13)
    return Stage(compute_structural, catalog, work / f"{tag}-features", opts)


def watch(nodes: list[Node], stages: list[Stage], seen: dict[str, set[str]], until=None,
          pids: dict[str, set[int]] | None = None, joining: Callable[[], None] | None = None) -> bool:
    """Record the nodes' worker titles in `seen` (and their PIDs in `pids`) every 50 ms while a
    stage runs, calling `joining` each time (a node still starting). With `until`, return True
    as soon as it holds for node 2's titles."""
    while any(s.thread.is_alive() for s in stages):
        if joining is not None:
            joining()
        for node in nodes:
            workers = node.workers()
            titles = set(workers.values())
            seen.setdefault(node.name, set()).update(titles)
            if pids is not None:
                pids.setdefault(node.name, set()).update(workers)
            if until is not None and node.name == "node2" and until(titles):
                return True
        time.sleep(0.05)
    return False


def errors(stages: dict[str, Stage]) -> dict[str, str]:
    for s in stages.values():
        s.thread.join()
    return {name: s.error for name, s in stages.items() if s.error}


def revive(nodes: list[Node], fresh: list[int], result: dict, retries: int = 2) -> None:
    """Start again a just-started worker node (`nodes[i]`, i in `fresh`) whose `ray start` gave
    up, at most `retries` times in the run (counted in result["node_restarts"]); fail, naming its
    log, past that. Ray waits a fixed 30 s for a new raylet to register, which a loaded 2-core
    machine can miss; that is not what this test is about."""
    for i in fresh:
        if nodes[i].proc.poll() is not None and result.get("node_restarts", 0) < retries:
            result["node_restarts"] = result.get("node_restarts", 0) + 1
            nodes[i] = nodes[i].restarted(result["node_restarts"])
        nodes[i].check()


def wait_for_nodes(ray, nodes: list[Node], fresh: list[int], work: Path, result: dict, timeout: float = 180.0
                   ) -> None:
    """Until the just-started worker nodes `nodes[i]`, i in `fresh`, are alive (each found in
    ray.nodes() by its node manager port), reviving any whose start gave up."""
    deadline = time.monotonic() + timeout
    while not all(nodes[i].port in {n["NodeManagerPort"] for n in ray.nodes() if n["Alive"]} for i in fresh):
        revive(nodes, fresh, result)
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes {[nodes[i].name for i in fresh]} not all alive after {timeout:.0f} s; "
                               f"see {work}/*.log")
        time.sleep(0.2)


class _Count(logging.Handler):
    """Counts the pool's resubmissions (a call lost with its node, which Ray did not retry)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def main(work: Path) -> int:
    import ray

    t0 = time.perf_counter()
    result: dict = {"timings": {}}
    resubmitted = _Count()
    logging.getLogger("simmerge_ray.actor_pool").addHandler(resubmitted)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **HEALTH,
                "SIMMERGE_CACHE": str(work / "cache")})
    os.environ.update(env)
    nodes: list[Node] = []
    try:
        (gcs,) = free_ports(1)
        nodes.append(Node(work, "head", env, gcs, head=True))
        spec, catalog = make_inputs(work)  # while the head starts
        result["timings"]["inputs_s"] = time.perf_counter() - t0
        (work / "result.json").write_text(json.dumps(result, indent=2))  # progress, for a post-mortem
        connect(gcs, nodes[0].check, 90)
        nodes.append(Node(work, "node2", env, gcs, head=False))
        wait_for_nodes(ray, nodes, [1], work, result)
        result["timings"]["cluster_s"] = time.perf_counter() - t0
        (work / "result.json").write_text(json.dumps(result, indent=2))

        t = time.perf_counter()
        ref = {"merge": merge(work, "ref", spec), "structural": structural(work, "ref", catalog, 2)}
        seen_ref: dict[str, set[str]] = {}
        watch(nodes, list(ref.values()), seen_ref)
        result["ref_errors"] = errors(ref)
        result["ref_seen"] = {k: sorted(v) for k, v in seen_ref.items()}
        result["timings"]["undisturbed_s"] = time.perf_counter() - t
        (work / "result.json").write_text(json.dumps(result, indent=2))

        # The lost run, in an order that makes the kill land mid-run whatever the machine's speed:
        # the structural pass asks for a third actor, which no node can host until the
        # replacement joins, so the pass (and its actor on node 2) waits; the merge starts; node
        # 2 is killed while it merges a unit: its merger holds its first unit there (a marker file
        # says so) until the kill, which a poll of process titles alone could miss on a fast
        # machine (the units there were all done between two polls).
        # The replacement's node type, declared as a RayJob declares its worker groups: this
        # cluster has no autoscaler, so its node types are the nodes alive, and a pool larger than
        # they can hold at once is refused as one that would wait forever.
        os.environ["SIMMERGE_NODE_TYPES"] = json.dumps({"replacement": {"CPU": 2, "merge_slot": 1, "gram_slot": 2}})
        t = time.perf_counter()
        seen_lost: dict[str, set[str]] = {}
        pids_lost: dict[str, set[int]] = {}
        lost = {"structural": structural(work, "lost", catalog, 3)}
        watch(nodes, list(lost.values()), seen_lost, until=lambda titles: "ray::GramWorker" in titles, pids=pids_lost)
        node2_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == nodes[1].port)
        held = work / "held-unit"
        lost["merge"] = merge(work, "lost", spec, held_on(node2_id, held))
        mid = watch(nodes, [lost["merge"]], seen_lost, until=lambda titles: held.exists(), pids=pids_lost)
        result["killed_mid_run"] = mid  # False: the merge ended and node 2 never held a unit
        if mid:  # the whole node goes, as a lost pod does: its raylet and every worker on it
            result["killed_pids"] = sorted(p.pid for p in nodes[1].processes())
            nodes[1].kill()
            result["killed_after_s"] = time.perf_counter() - t
        # The replacement: room for the restarted actors and the structural pass's third.
        nodes.append(Node(work, "node3", env, gcs, head=False, slots={"merge_slot": 1, "gram_slot": 2}))
        watch(nodes, list(lost.values()), seen_lost, pids=pids_lost, joining=lambda: revive(nodes, [2], result))
        result["lost_errors"] = errors(lost)
        result["lost_seen"] = {k: sorted(v) for k, v in seen_lost.items()}
        # Which nodes merged units, from the PIDs the merge reports per unit: the unit node 2 held
        # when it died is retried by its actor restarted on the replacement. (A title poll can miss
        # that actor: the surviving actor takes the remaining units meanwhile, so it may live briefly.)
        unit_pids = {u["pid"] for u in lost["merge"].result.per_unit} if lost["merge"].result else set()
        result["lost_merge_nodes"] = sorted(name for name, ps in pids_lost.items() if ps & unit_pids)
        result["timings"]["lost_s"] = time.perf_counter() - t
        result["alive_nodes_after"] = sum(n["Alive"] for n in ray.nodes())
        result["resubmitted_calls"] = resubmitted.n
    finally:
        ray.shutdown()
        for node in nodes:
            node.kill()
        result["timings"]["total_s"] = time.perf_counter() - t0
        (work / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
