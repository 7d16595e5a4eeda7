"""Can this cluster ever host an actor with this ask? Checked before any work is submitted.

Ray leaves a task or actor whose resources no node has pending forever (with a warning in the
logs), and on an autoscaling cluster it cannot tell "no node yet" from "no node ever". This
module answers it from the node types the cluster can have:

- the nodes alive now (`ray.nodes()`), the head included;
- the node types an autoscaler reported to the GCS (`ClusterConfig`, written by autoscalers
  that report it; Ray's own v1 autoscaler and KubeRay's do not);
- the node types declared in SIMMERGE_NODE_TYPES: inline JSON `{"type": {"CPU": 8, ...,
  "max_count": 4}}` (max_count: how many such nodes at most; unbounded when left out), or
  the path of a Ray autoscaler config (its `available_node_types`) or of a KubeRay
  RayCluster/RayJob/RayService manifest (its worker groups). cluster/render.py sets it in every
  manifest's runtime env from the same worker groups it renders.

An ask that fits none of them raises `UnsatisfiableAsk`, one line naming the resource. When an
autoscaler runs but declares no node types (nothing to check against) the check is skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from simmerge_ray.errors import ConfigError
from simmerge_ray.resources import ResourceAsk

NODE_TYPES_ENV = "SIMMERGE_NODE_TYPES"
AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS (v1 monitor)


HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node
GROUP_LABEL = "ray.io/node-group"  # the node type a node was launched as (RAY_NODE_TYPE_NAME), when set
UNBOUNDED = 1 << 30  # a declared node type without max_count: as many as the autoscaler likes
RAY_DEFAULT_MAX_WORKERS = 2  # a Ray autoscaler config's max_workers when it sets none


class UnsatisfiableAsk(ConfigError):
    """An actor's resource ask that no node type of the cluster offers."""


@dataclass(frozen=True)
class NodeType:
    """What one node of a kind offers Ray's scheduler; max_count 0: none can exist."""

    name: str
    resources: dict[str, float]
    max_count: int = 1
    head: bool = False  # a live node that is the cluster's head (it belongs to no worker type)
    group: str | None = None  # a live node's `ray.io/node-group` label: the node type that launched it


def ask_bundle(ask: ResourceAsk, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """The ask as Ray resource names -> amounts (zero amounts left out)."""
    bundle = {"CPU": ask.num_cpus, "GPU": ask.num_gpus, "memory": float(ask.memory or 0), **(extra or {})}
    return {k: float(v) for k, v in bundle.items() if v}


def live_node_types() -> list[NodeType]:
    """The alive nodes of the connected cluster, one entry each."""
    import ray

    return [NodeType(f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]})",
                     {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")},
                     head=HEAD_RESOURCE in n["Resources"], group=(n.get("Labels") or {}).get(GROUP_LABEL))
            for n in ray.nodes() if n["Alive"]]


# What a live node shows beyond its type's declaration: Ray's own accounting of memory and the
# object store, and the accelerator label it adds on GPU nodes.
_NOT_DECLARED = ("memory", "object_store_memory", "accelerator_type:")


def _of_type(node: NodeType, kind: NodeType) -> bool:
    """Whether a live worker node is one of `kind`'s nodes: by the group label the autoscaler or
    KubeRay gave it when it has one, else by shape (the same CPUs, GPUs and custom resources as
    the type declares; memory as declared and as Ray counts it differ)."""
    if node.group is not None:
        return node.group == kind.name
    keys = {"CPU", "GPU"} | {k for k in {*node.resources, *kind.resources} if not k.startswith(_NOT_DECLARED)}
    return all(node.resources.get(k, 0.0) == kind.resources.get(k, 0.0) for k in keys)


def counted_once(live: list[NodeType], kinds: list[NodeType]) -> list[NodeType]:
    """The live nodes, each with the resources Ray reports, and the declared or reported node
    types, less the live worker nodes that are among a type's nodes: those count once, as
    themselves, and the type keeps the nodes it can still add (a RayJob's cluster is its declared
    groups; its live workers are some of them). A live node of no type with nodes left (the
    head, a node added by hand) takes nothing from any type."""
    left = [k.max_count for k in kinds]
    for node in live:
        i = None if node.head else next((i for i, k in enumerate(kinds) if left[i] > 0 and _of_type(node, k)), None)
        if i is not None:
            left[i] -= 1
    return live + [replace(k, max_count=n) for k, n in zip(kinds, left)]


def reported_node_types() -> list[NodeType]:
    """Node types an autoscaler reported to the GCS (empty when none did)."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return []
    return [NodeType(g.name or f"group {i}", {k: float(v) for k, v in g.resources.items()},
                     g.max_count if g.max_count >= 0 else UNBOUNDED)
            for i, g in enumerate(config.node_group_configs)]


def autoscaler_running() -> bool:
    """Whether an autoscaler can add nodes. Ray's monitor publishes its status in the GCS; a
    plain `ray start`/`ray.init` runs it too, with a read-only provider whose node types are the
    nodes themselves (`node_<node id>`), so such a report means no autoscaling."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    raw = _internal_kv_get(AUTOSCALER_STATUS_KEY) if _internal_kv_initialized() else None
    try:
        report = json.loads(raw).get("autoscaler_report") if raw else None
    except ValueError:
        return False
    if not report:
        return False
    mapping = report.get("node_type_mapping") or {}
    return not all(kind == f"node_{node}" for node, kind in mapping.items())


def declared_node_types(env: Mapping[str, str] | None = None) -> list[NodeType]:
    """The node types SIMMERGE_NODE_TYPES declares (empty when unset)."""
    text = (os.environ if env is None else env).get(NODE_TYPES_ENV, "").strip()
    if not text:
        return []
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{NODE_TYPES_ENV}: not JSON ({e})") from None
        return [NodeType(name, {k: float(v) for k, v in (spec.get("resources", spec)).items()
                                if k != "max_count"}, int(spec.get("max_count", UNBOUNDED)))
                for name, spec in raw.items()]
    return node_types_from_file(Path(text))


def node_types_from_file(path: Path) -> list[NodeType]:
    """Node types of a Ray autoscaler config (JSON or YAML) or of a KubeRay manifest."""
    import yaml

    from simmerge_ray import kuberay

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{NODE_TYPES_ENV}={path}: cannot read it ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{NODE_TYPES_ENV}={path}: not a mapping")
    if "available_node_types" in doc:
        return [NodeType(name, {k: float(v) for k, v in t.get("resources", {}).items()},
                         int(t.get("max_workers", 0 if name == doc.get("head_node_type")
                                   else doc.get("max_workers", RAY_DEFAULT_MAX_WORKERS))))
                for name, t in doc["available_node_types"].items()]
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if "workerGroupSpecs" not in cluster:
        raise ConfigError(f"{NODE_TYPES_ENV}={path}: neither a Ray autoscaler config (available_node_types) "
                          "nor a KubeRay manifest (workerGroupSpecs)")
    out = []
    for group in cluster["workerGroupSpecs"]:
        c = kuberay.group_capacity(group)
        res = {"CPU": c.cpus, "GPU": c.gpus, **({"memory": float(c.memory)} if c.memory else {}),
               **{k: float(v) for k, v in group.get("resources", {}).items() if k not in ("CPU", "GPU", "memory")}}
        out.append(NodeType(c.group, res, c.max_replicas * int(group.get("numOfHosts", 1))))
    return out


def cluster_node_types() -> tuple[list[NodeType], bool]:
    """(every node type known for the connected cluster, whether that list is complete)."""
    live, reported, declared = live_node_types(), reported_node_types(), declared_node_types()
    complete = bool(reported or declared) or not autoscaler_running()
    return counted_once(live, known_kinds(reported, declared)), complete


def known_kinds(reported: list[NodeType], declared: list[NodeType]) -> list[NodeType]:
    """The node types an autoscaler reported, and those SIMMERGE_NODE_TYPES declares beyond them:
    a group both name (a RayJob's manifest declared to a cluster whose autoscaler reports it too)
    counts once, as the autoscaler reports it."""
    named = {k.name for k in reported}
    return reported + [k for k in declared if k.name not in named]


def _fmt(amount: float, resource: str) -> str:
    return f"{amount / 2**30:.3g} GiB" if resource == "memory" else f"{amount:g}"


def unsatisfiable_reason(what: str, bundle: Mapping[str, float], types: list[NodeType]) -> str | None:
    """None when some node type holds `bundle`, else one line naming the resource short."""
    usable = [t for t in types if t.max_count > 0]
    if any(all(t.resources.get(k, 0.0) >= v for k, v in bundle.items()) for t in usable):
        return None
    asked = ", ".join(f"{k}={_fmt(v, k)}" for k, v in bundle.items())
    names = ", ".join(sorted({t.name for t in usable})) or "none"
    for resource, amount in bundle.items():
        most = max((t.resources.get(resource, 0.0) for t in usable), default=0.0)
        if most < amount:
            together = f" ({asked})" if len(bundle) > 1 else ""
            return (f"{what} asks for {resource}={_fmt(amount, resource)}{together} but no node type of this "
                    f"cluster offers that much {resource} (the most: {_fmt(most, resource)}; node types: {names})")
    return (f"{what} asks for {asked} together, which no single node type of this cluster offers "
            f"(node types: {names})")


def gang_capacity(bundle: Mapping[str, float], types: list[NodeType]) -> int:
    """How many copies of `bundle` the node types can hold at once (each node packs whole copies,
    counted as Ray does, in ten-thousandths). With `counted_once`'s types a live node of a declared
    type counts once; still an upper bound where a type declares more nodes than its cloud will
    give, where an autoscaler's report and SIMMERGE_NODE_TYPES name the same groups differently,
    or where a live node's shape matches no declared type."""
    if not bundle:
        return UNBOUNDED
    return min(UNBOUNDED, sum(t.max_count * min(_units(t.resources.get(k, 0.0)) // max(1, _units(v))
                                                for k, v in bundle.items())
                              for t in types if t.max_count > 0))


def _units(amount: float) -> int:
    return round(amount * 10_000)


def _known_types() -> list[NodeType] | None:
    """Every node type of the connected cluster, or None when that is not known: Ray not started
    (a local Ray started later gets this machine's resources), or an autoscaler that declares none."""
    import ray

    if not ray.is_initialized():
        return None
    types, complete = cluster_node_types()
    return types if complete else None


def placed_count(count: int, ask: ResourceAsk, extra: Mapping[str, float] | None = None, *, each: str,
                 group: str | None) -> int:
    """How many copies of the ask to start, all at once (a Ray Train worker group starts whole or
    not at all, and so does an actor pool that hands every actor work; Ray would wait for them
    forever): `count`, or for a default count (`group` None) the most the connected cluster can
    ever hold. UnsatisfiableAsk when no node type holds one copy (naming `each`, what sets the
    ask) or when a count a user set (named by `group`) can never run at once. Nodes that exist
    now count whole, busy or not: only "never" is refused, not "not yet". The node types are
    read once; `count` as it is while they are not known."""
    types = _known_types()
    if types is None:
        return count
    bundle = ask_bundle(ask, extra)
    reason = unsatisfiable_reason(each, bundle, types)
    if reason:
        raise UnsatisfiableAsk(reason)
    most = gang_capacity(bundle, types)
    if most >= count or group is None:
        return min(count, most)
    asked = ", ".join(f"{k}={_fmt(v, k)}" for k, v in bundle.items())
    names = ", ".join(sorted({t.name for t in types if t.max_count > 0})) or "none"
    raise UnsatisfiableAsk(f"{group}: {count} workers of {asked} each must run at once, but this cluster holds "
                           f"at most {most} (node types: {names}); ask for at most {most}, or add nodes")


def check_gang_placeable(what: str, ask: ResourceAsk, count: int, extra: Mapping[str, float] | None = None) -> None:
    """Raise UnsatisfiableAsk when the connected cluster can never hold `count` copies of the ask
    at once (placed_count, `what` naming both one copy and the group)."""
    placed_count(count, ask, extra, each=what, group=what)


def check_placeable(what: str, ask: ResourceAsk, extra: Mapping[str, float] | None = None) -> None:
    """Raise UnsatisfiableAsk at once when no node type of the connected cluster can host the ask
    (no check while its node types are not known: _known_types)."""
    types = _known_types()
    reason = None if types is None else unsatisfiable_reason(what, ask_bundle(ask, extra), types)
    if reason:
        raise UnsatisfiableAsk(reason)
