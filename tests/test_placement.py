"""simmerge_ray.placement: an ask no node type offers fails at once, naming the resource; the
cluster manifests' asks are the jobs' asks, and fit the node types each job declares."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml

from simmerge_ray import job_entrypoint, placement, resources
from simmerge_ray.placement import NodeType, UnsatisfiableAsk, ask_bundle, unsatisfiable_reason
from simmerge_ray.resources import ResourceAsk
from job_entry import load_entry  # beside this file

REPO = Path(__file__).resolve().parents[1]
RAYJOBS = sorted((REPO / "cluster").glob("rayjob-*.yaml"))
GIB = 2**30
TYPES = [NodeType("head", {"CPU": 0.0, "memory": 8.0 * GIB}),
         NodeType("cpu", {"CPU": 8.0, "memory": 22.0 * GIB}, 8),
         NodeType("gpu", {"CPU": 8.0, "GPU": 1.0, "memory": 46.0 * GIB}, 4),
         NodeType("big", {"CPU": 64.0}, 0)]  # max_count 0: can never exist


def test_reason_names_the_resource_that_no_node_type_has() -> None:
    assert unsatisfiable_reason("x", ask_bundle(ResourceAsk(4, 1, 24 * GIB)), TYPES) is None
    msg = unsatisfiable_reason("label actor", ask_bundle(ResourceAsk(4, 2)), TYPES)
    assert msg == ("label actor asks for GPU=2 (CPU=4, GPU=2) but no node type of this cluster offers that much "
                   "GPU (the most: 1; node types: cpu, gpu, head)")
    msg = unsatisfiable_reason("m", ask_bundle(ResourceAsk(16)), TYPES)  # 'big' has 64 CPUs but max_count 0
    assert msg.startswith("m asks for CPU=16 but") and "(the most: 8;" in msg
    assert unsatisfiable_reason("m", ask_bundle(ResourceAsk(1, 0, 30 * GIB)), TYPES) is None  # the gpu type
    msg = unsatisfiable_reason("m", ask_bundle(ResourceAsk(1, 0, 50 * GIB)), TYPES)
    assert msg.startswith("m asks for memory=50 GiB (CPU=1, memory=50 GiB)") and "(the most: 46 GiB;" in msg
    msg = unsatisfiable_reason("m", ask_bundle(ResourceAsk(1), {"nvme": 1}), TYPES)
    assert msg.startswith("m asks for nvme=1 (CPU=1, nvme=1)") and "(the most: 0;" in msg
    # Each resource exists somewhere, but not together on one node type.
    msg = unsatisfiable_reason("m", {"GPU": 1.0, "memory": 20.0 * GIB, "CPU": 8.0}, TYPES[:2] + [
        NodeType("gpu-small", {"CPU": 8.0, "GPU": 1.0, "memory": 10.0 * GIB})])
    assert msg.startswith("m asks for GPU=1, memory=20 GiB, CPU=8 together, which no single node type")


def test_declared_node_types_inline_autoscaler_config_and_manifest(tmp_path: Path) -> None:
    inline = {placement.NODE_TYPES_ENV: '{"w": {"CPU": 2, "max_count": 3}}'}
    assert placement.declared_node_types(inline) == [NodeType("w", {"CPU": 2.0}, 3)]
    cfg = {"max_workers": 5, "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0},
        "ray.worker.cpu": {"resources": {"CPU": 1, "nvme": 2}, "min_workers": 0, "max_workers": 3}}}
    (tmp_path / "as.json").write_text(json.dumps(cfg))
    assert placement.declared_node_types({placement.NODE_TYPES_ENV: str(tmp_path / "as.json")}) == [
        NodeType("ray.head.default", {"CPU": 0.0}, 0), NodeType("ray.worker.cpu", {"CPU": 1.0, "nvme": 2.0}, 3)]
    types = placement.node_types_from_file(REPO / "cluster" / "raycluster.yaml")
    assert types == [NodeType("cpu", {"CPU": 8.0, "GPU": 0.0, "memory": 22.0 * GIB}, 8),
                     NodeType("gpu", {"CPU": 8.0, "GPU": 1.0, "memory": 46.0 * GIB}, 4)]
    assert placement.declared_node_types({}) == []
    with pytest.raises(placement.ConfigError, match="SIMMERGE_NODE_TYPES: not JSON"):
        placement.declared_node_types({placement.NODE_TYPES_ENV: "{oops"})
    (tmp_path / "other.yaml").write_text("a: 1\n")
    with pytest.raises(placement.ConfigError, match="neither a Ray autoscaler config"):
        placement.node_types_from_file(tmp_path / "other.yaml")


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_manifest_asks_are_the_jobs_asks_and_fit_the_declared_node_types(path: Path) -> None:
    """One place: the entrypoint's flags. What the manifest checker reads from them equals what
    the job itself exports to the library (jobs/_entry.py's parser, resources.export), and each
    ask fits a node type the job declares (SIMMERGE_NODE_TYPES), which are the manifest's own
    worker groups."""
    spec = yaml.safe_load(path.read_text())["spec"]
    env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    stage, manifest_asks = job_entrypoint.job_asks(spec["entrypoint"], env_vars)
    args, _ = load_entry().build_parser(stage).parse_known_args(shlex.split(spec["entrypoint"])[2:])
    exported = dict(env_vars)
    resources.export(resources.resources_from_flags(args, env_vars), exported)
    job = resources.StageResources.from_env(exported)
    assert manifest_asks == {role: job.for_role(role) for role in resources.STAGE_ROLES[stage]}
    assert any(a.memory for a in manifest_asks.values())  # the manifests do set memory

    declared = placement.declared_node_types(env_vars)
    assert declared == placement.node_types_from_file(path)
    for role, ask in manifest_asks.items():
        assert unsatisfiable_reason(role, ask_bundle(ask), declared) is None, (role, ask)
    # Doubling the largest CPU ask of a job makes it unsatisfiable there, named.
    role, ask = max(manifest_asks.items(), key=lambda kv: kv[1].num_cpus)
    too_big = ResourceAsk(2 * max(t.resources["CPU"] for t in declared), ask.num_gpus, ask.memory)
    assert unsatisfiable_reason(role, ask_bundle(too_big), declared).startswith(f"{role} asks for CPU=")


def test_check_placeable_on_a_fixed_cluster(ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the session's fixed 4-CPU cluster (no autoscaler): a 1-CPU ask passes, an 8-CPU ask
    and a custom resource fail at once."""
    monkeypatch.delenv(placement.NODE_TYPES_ENV, raising=False)
    placement.check_placeable("x", ResourceAsk(1))
    t = time.perf_counter()
    with pytest.raises(UnsatisfiableAsk, match=r"^structural actor asks for CPU=8 but no node type"):
        placement.check_placeable("structural actor", ResourceAsk(8))
    with pytest.raises(UnsatisfiableAsk, match=r"^merge worker asks for nvme=1 .*\(the most: 0;"):
        placement.check_placeable("merge worker", ResourceAsk(1), {"nvme": 1})
    assert time.perf_counter() - t < 5


def test_gang_capacity_packs_whole_copies_per_node() -> None:
    """Copies of a bundle per node are whole (8 CPUs hold two 3-CPU workers, not 2.67), times
    each type's max_count; a type that can never exist holds none."""
    assert placement.gang_capacity({"CPU": 3.0}, TYPES) == 8 * 2 + 4 * 2
    assert placement.gang_capacity({"CPU": 1.0, "GPU": 1.0}, TYPES) == 4
    assert placement.gang_capacity({"CPU": 1.0, "memory": 20.0 * GIB}, TYPES) == 8 * 1 + 4 * 2
    assert placement.gang_capacity({"nvme": 1.0}, TYPES) == 0


def test_a_live_node_of_a_declared_type_counts_once() -> None:
    """A RayJob's cluster is its declared worker groups, some of them alive now: a live worker of
    a group takes one off the group's max_count instead of counting again beside it (a pool of
    6 three-CPU actors on the 'cpu' type's 2 nodes was let through and waited), and keeps the
    resources Ray reports (a memory ask a live node holds is not refused because the type
    declares less). The head and a node of no declared shape take nothing from any type."""
    cpu = NodeType("cpu", {"CPU": 8.0}, 2)  # declared without memory, as an autoscaler config may
    gpu = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0, "memory": 46.0 * GIB}, 1)
    head = NodeType("node 10.0.0.1 (aaaa)", {"CPU": 8.0, "memory": 6.0 * GIB, "object_store_memory": 2.0 * GIB},
                    head=True)

    def live(name: str, group: str | None = None, **res: float) -> NodeType:  # as Ray reports a node
        return NodeType(name, {"memory": 19.5 * GIB, "object_store_memory": 8.0 * GIB, **res}, group=group)

    w1, w2, w3 = (live(f"node 10.0.0.{i} ({i}{i}{i}{i})", CPU=8.0) for i in (2, 3, 4))
    g1 = live("node 10.0.0.5 (5555)", CPU=8.0, GPU=1.0, **{"accelerator_type:A10G": 1.0})
    odd = live("node 10.0.0.6 (6666)", CPU=4.0)
    types = placement.counted_once([head, w1, g1, odd], [cpu, gpu])
    assert types == [head, w1, g1, odd, NodeType("cpu", {"CPU": 8.0}, 1), NodeType("gpu", gpu.resources, 0)]
    assert placement.gang_capacity({"CPU": 3.0}, types) == 2 + 2 + 2 + 1 + 2  # was 13: w1 and g1 twice
    # The live 'cpu' node holds a memory ask its declaration does not show.
    assert placement.gang_capacity({"CPU": 1.0, "memory": 8.0 * GIB}, types) == 2 + 2 + 2  # w1, g1, odd
    assert unsatisfiable_reason("a", {"CPU": 1.0, "memory": 8.0 * GIB}, types) is None
    # Three live 'cpu' nodes where two are declared: the third is real, and the type has none left.
    assert placement.counted_once([w1, w2, w3], [cpu]) == [w1, w2, w3, NodeType("cpu", {"CPU": 8.0}, 0)]
    # Custom resources are part of a type's shape: a node without the declared slot is another kind.
    slotted = NodeType("slotted", {"CPU": 8.0, "merge_slot": 1.0}, 1)
    assert placement.counted_once([w1], [slotted]) == [w1, slotted]
    # A node's group label (ray.io/node-group) decides over its shape: an 8-CPU node of another
    # group takes nothing from 'cpu', and one labelled 'slotted' is a 'slotted' node.
    other, labelled = live("n7", group="spot", CPU=8.0), live("n8", group="slotted", CPU=8.0)
    assert placement.counted_once([other, labelled], [cpu, slotted]) == [
        other, labelled, cpu, NodeType("slotted", slotted.resources, 0)]


def test_the_head_is_marked_among_the_live_nodes(ray_cluster) -> None:
    (node,) = placement.live_node_types()
    assert node.head and node.resources["CPU"] == 4.0 and not any(k.startswith("node:") for k in node.resources)


def test_a_worker_group_larger_than_the_cluster_fails_at_once(ray_cluster, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit --workers N` beyond what the fixed 4-CPU cluster can ever hold at once is one line
    naming the flag and the most it holds (Ray Train waited for the group forever, silently);
    the same fit with 2 workers trains."""
    from input_checks import cli_status
    from test_selector import synthetic_tables  # beside this file

    monkeypatch.delenv(placement.NODE_TYPES_ENV, raising=False)
    placement.check_gang_placeable("g", ResourceAsk(1), 4)
    with pytest.raises(UnsatisfiableAsk, match=r"^g: 5 workers of CPU=1 each must run at once, but this cluster "
                                               r"holds at most 4 \(node types: node "):
        placement.check_gang_placeable("g", ResourceAsk(1), 5)
    with pytest.raises(UnsatisfiableAsk, match=r"^g: 3 workers of CPU=2 each .* holds at most 2 "):
        placement.check_gang_placeable("g", ResourceAsk(2), 3)
    lab, feat = synthetic_tables(n_models=6)
    feats, labels = tmp_path / "features.parquet", tmp_path / "labels.parquet"
    feat.write_parquet(feats)
    lab.write_parquet(labels)
    t = time.perf_counter()
    argv = ["fit", "--features", str(feats), "--labels", str(labels), "--epochs", "5", "--calibration-folds", "0"]
    # refused before the search (64 trials would take minutes), not after it
    assert cli_status([*argv, "--out", str(tmp_path / "sel8"), "--workers", "8", "--tune-samples", "64"]) == 2
    assert time.perf_counter() - t < 30
    assert not (tmp_path / "sel8").exists()
    assert cli_status([*argv, "--out", str(tmp_path / "sel2"), "--workers", "2", "--tune-samples", "0"]) == 0
    assert (tmp_path / "sel2").is_dir()


def test_max_counts_left_out_take_the_defaults_of_their_source(tmp_path: Path) -> None:
    """A node type without a count was taken as at most one node, which the group checks then
    refused on autoscaling clusters that could add many: inline JSON leaves it unbounded, a Ray
    autoscaler config takes its own max_workers else Ray's 2, a KubeRay group the CRD's default
    maxReplicas, times numOfHosts."""
    assert placement.declared_node_types({placement.NODE_TYPES_ENV: '{"gpu": {"GPU": 1, "CPU": 8}}'}) == [
        NodeType("gpu", {"GPU": 1.0, "CPU": 8.0}, placement.UNBOUNDED)]
    (tmp_path / "as.yaml").write_text(yaml.safe_dump({"available_node_types": {"w": {"resources": {"CPU": 1}}}}))
    assert placement.node_types_from_file(tmp_path / "as.yaml") == [NodeType("w", {"CPU": 1.0}, 2)]
    doc = yaml.safe_load((REPO / "cluster" / "raycluster.yaml").read_text())
    group = doc["spec"]["workerGroupSpecs"][0]
    del group["maxReplicas"]
    group["numOfHosts"] = 2
    (tmp_path / "rc.yaml").write_text(yaml.safe_dump(doc))
    assert placement.node_types_from_file(tmp_path / "rc.yaml")[0].max_count == 2 * (2**31 - 1)
    unbounded = [NodeType("gpu", {"GPU": 1.0, "CPU": 8.0}, placement.UNBOUNDED)]
    assert placement.gang_capacity({"GPU": 1.0}, unbounded) == placement.UNBOUNDED


def test_gang_capacity_counts_fractional_asks_as_ray_does() -> None:
    """7 CPUs hold 100 asks of 0.07 (7 / 0.07 is 99.99... in floating point: one refused too many)."""
    assert placement.gang_capacity({"CPU": 0.07}, [NodeType("n", {"CPU": 7.0})]) == 100
    assert placement.gang_capacity({"CPU": 0.14}, [NodeType("n", {"CPU": 7.0})]) == 50
    assert placement.gang_capacity({"CPU": 3.0}, [NodeType("n", {"CPU": 8.0})]) == 2


def test_a_group_both_reported_and_declared_counts_once() -> None:
    """An autoscaler that reports its groups, and a RayJob whose manifest declares the same ones:
    each group's nodes counted once (as reported), a declared group it does not report kept."""
    reported = [NodeType("cpu", {"CPU": 8.0}, 4)]
    declared = [NodeType("cpu", {"CPU": 8.0, "memory": 22.0 * GIB}, 8), NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 2)]
    kinds = placement.known_kinds(reported, declared)
    assert kinds == [reported[0], declared[1]]
    assert placement.gang_capacity({"CPU": 8.0}, kinds) == 4 + 2
