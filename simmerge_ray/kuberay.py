"""Offline checks of KubeRay manifests: CRD schema (strict) and whether each job's actors can land.

The Kubernetes API server validates a RayCluster, RayJob or RayService against the JSON schema in
its CRD, but it silently prunes fields the schema does not declare, so a misspelt key is lost
rather than reported. `strict_schema()` closes every object the CRD does not leave open, so a
typo is an error here. `placement_problems()` reads the resource flags of a RayJob's entrypoint
(`python jobs/<stage>.py ...`) the way the job itself reads them and checks that each actor role
of that stage fits some worker group, e.g. that a GPU inference actor has a GPU group to land on.

    python -m simmerge_ray.kuberay cluster/*.yaml --crds ../shared/kuberay
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simmerge_ray import resources
from simmerge_ray.arg_parser import Parser
from simmerge_ray.errors import ConfigError

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# Ray's default split of a node's memory when rayStartParams has no `memory`: about 30% goes to
# the object store, the rest is what actors can reserve.
RAY_DEFAULT_MEMORY_SHARE = 0.7
_JOB_SCRIPT = re.compile(r"(?:^|/)jobs/(\w+)\.py$")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are MBs: the C loader is 20x faster


def load_crd_schema(path: Path, version: str = "v1") -> dict:
    """spec.versions[name=version].schema.openAPIV3Schema of a CRD file."""
    crd = yaml.load(Path(path).read_text(), Loader=_Loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise ConfigError(f"{path}: no version {version!r} in the CRD")


def strict_schema(schema: dict) -> dict:
    """A copy where every object that declares no way to hold unknown keys rejects them.

    Left open: objects with `additionalProperties` (maps), with x-kubernetes-preserve-unknown-fields,
    and the top-level `metadata` (an ObjectMeta, checked by the API server, not by the CRD).
    `nullable: true` becomes a JSON-schema null type.
    """
    out = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                close(item)
            return
        if not isinstance(node, dict):
            return
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        is_object = node.get("type") == "object" or "properties" in node
        if is_object and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for child in value.values():
                    close(child)
            elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
                close(value)

    close(out)
    out["properties"]["metadata"].pop("additionalProperties", None)
    return out


@functools.lru_cache(maxsize=8)
def strict_crd_schema(path: Path) -> dict:
    """The strict schema of a CRD file, loaded once per process (callers must not mutate it)."""
    return strict_schema(load_crd_schema(path))


def schema_errors(doc: dict, schema: dict) -> list[str]:
    """Every violation of `schema` in `doc`, as 'path: message'."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def parse_cpu(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity: '500m' -> 0.5, '4' -> 4.0."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ConfigError(f"CPU quantity {text!r} is not a number (e.g. 4, 500m)") from None


def _first_container(group: dict) -> dict:
    """The group's Ray container; the CRD lets `containers` be empty, which the checks cannot read."""
    containers = group["template"]["spec"]["containers"]
    if not containers:
        raise ConfigError(f"group {group.get('groupName', 'head')!r}: template.spec.containers is empty")
    return containers[0]


@dataclass(frozen=True)
class Capacity:
    """What one node of a worker group offers Ray's scheduler."""

    group: str
    cpus: float
    gpus: float
    memory: int | None  # bytes; None when the pod sets no memory limit
    max_replicas: int

    def fits(self, ask: resources.ResourceAsk) -> bool:
        memory_ok = ask.memory is None or self.memory is None or ask.memory <= self.memory
        return self.max_replicas > 0 and ask.num_cpus <= self.cpus and ask.num_gpus <= self.gpus and memory_ok


def group_capacity(group: dict) -> Capacity:
    """Ray's view of a group's node: group `resources` > rayStartParams > the container's limits."""
    params = group.get("rayStartParams", {})
    override = group.get("resources", {})
    container = _first_container(group)
    limits = {**container.get("resources", {}).get("requests", {}), **container.get("resources", {}).get("limits", {})}

    cpus = override.get("CPU", params.get("num-cpus", limits.get("cpu", 0)))
    gpus = override.get("GPU", params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    if "memory" in override or "memory" in params:
        memory: int | None = resources.parse_bytes(override.get("memory", params.get("memory")),
                                                   what=f"group {group.get('groupName')} memory")
    elif "memory" in limits:
        memory = int(RAY_DEFAULT_MEMORY_SHARE * resources.parse_bytes(limits["memory"], what="memory limit"))
    else:
        memory = None
    return Capacity(group.get("groupName", "head"), parse_cpu(cpus), float(gpus), memory,
                    int(group.get("maxReplicas", 1)))


def gpu_mismatch(group: dict) -> str | None:
    """A group whose pods request GPUs must advertise the same number to Ray, and vice versa."""
    container = _first_container(group)
    pod_gpus = float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    ray_gpus = group_capacity(group).gpus
    if pod_gpus != ray_gpus:
        return (f"worker group {group.get('groupName')!r}: pods get nvidia.com/gpu={pod_gpus:g} "
                f"but Ray is told num-gpus={ray_gpus:g}")
    return None


def job_asks(entrypoint: str, env_vars: dict[str, str] | None = None) -> tuple[str, dict[str, resources.ResourceAsk]]:
    """The stage an entrypoint runs and the ask of each actor role it starts (flags over env_vars)."""
    try:
        words = shlex.split(entrypoint)
    except ValueError as e:  # an unbalanced quote
        raise ConfigError(f"entrypoint {entrypoint!r}: {e}") from None
    found = [(i, m.group(1)) for i, w in enumerate(words) if (m := _JOB_SCRIPT.search(w))]
    if not found or found[0][1] not in resources.STAGE_ROLES:
        raise ConfigError(f"entrypoint {entrypoint!r} does not run a jobs/<stage>.py script "
                          f"(stages: {', '.join(resources.STAGE_ROLES)})")
    index, stage = found[0]
    parser = argparse.ArgumentParser(allow_abbrev=False)
    resources.add_resource_flags(parser)
    args, _ = parser.parse_known_args(words[index + 1:])
    asks = resources.resources_from_flags(args, env_vars or {})
    return stage, {role: asks.for_role(role) for role in resources.STAGE_ROLES[stage]}


def placement_problems(asks: dict[str, resources.ResourceAsk], cluster_spec: dict) -> list[str]:
    """One message per actor role that no worker group of `cluster_spec` can host."""
    groups = [group_capacity(g) for g in cluster_spec.get("workerGroupSpecs", [])]
    problems = []
    for role, ask in asks.items():
        if not any(c.fits(ask) for c in groups):
            offered = "; ".join(f"{c.group}: {c.cpus:g} CPU, {c.gpus:g} GPU, "
                                f"{'?' if c.memory is None else f'{c.memory / 2**30:.1f} GiB'}, "
                                f"max {c.max_replicas}" for c in groups) or "no worker groups"
            problems.append(f"{role} actor asking {ask.ray_options()} fits no worker group ({offered})")
    return problems


def cluster_problems(cluster_spec: dict) -> list[str]:
    problems = [m for g in cluster_spec.get("workerGroupSpecs", []) if (m := gpu_mismatch(g))]
    for g in cluster_spec.get("workerGroupSpecs", []):
        if g["minReplicas"] > g["maxReplicas"]:
            problems.append(f"worker group {g['groupName']!r}: minReplicas > maxReplicas")
    return problems


def manifest_problems(doc: dict, crd_dir: Path, job_clusters: list[dict] = ()) -> list[str]:
    """Schema violations and placement problems of one manifest.

    A RayJob's asks are checked against its own rayClusterSpec, and against each cluster spec in
    `job_clusters` (e.g. a standing RayCluster the same entrypoint is submitted to).
    """
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    problems = schema_errors(doc, strict_crd_schema(Path(crd_dir).resolve() / CRD_FILES[kind]))
    if problems:  # the checks below read fields the schema requires
        return problems
    try:
        return _semantic_problems(kind, doc.get("spec", {}), job_clusters)
    except ConfigError as e:
        return [str(e)]


def _semantic_problems(kind: str, spec: dict, job_clusters: list[dict]) -> list[str]:
    """Resource and placement problems of a schema-valid manifest's spec."""
    problems: list[str] = []
    if kind == "RayCluster":
        problems += cluster_problems(spec)
    elif kind == "RayService":
        problems += cluster_problems(spec.get("rayClusterConfig", {}))
        apps = _embedded_yaml(spec, "serveConfigV2")
        if not all(a.get("import_path") for a in apps.get("applications", [])) or not apps.get("applications"):
            problems.append("serveConfigV2: every application needs an import_path")
    elif kind == "RayJob":
        env = _embedded_yaml(spec, "runtimeEnvYAML")
        _, asks = job_asks(spec.get("entrypoint", ""), env.get("env_vars"))
        clusters = ([spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []) + list(job_clusters)
        if not clusters:
            problems.append("RayJob has no rayClusterSpec and no cluster to check it against")
        for cluster in clusters:
            problems += cluster_problems(cluster) + placement_problems(asks, cluster)
    return problems


def _embedded_yaml(spec: dict, key: str) -> dict:
    """spec[key], a YAML mapping held in a string (runtimeEnvYAML, serveConfigV2)."""
    try:
        value = yaml.safe_load(spec.get(key, "")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"spec.{key} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"spec.{key} is not a YAML mapping")
    return value


def load_manifest(path: Path) -> dict:
    """One manifest file as a mapping; a missing, unreadable or non-mapping file is a ConfigError."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a manifest (a YAML mapping with kind, spec)")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m simmerge_ray.kuberay", description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--crds", type=Path, required=True, help="folder with the KubeRay CRD YAML files")
    args = parser.parse_args(argv)
    try:
        missing = [f for f in CRD_FILES.values() if not (args.crds / f).is_file()]
        if missing:
            raise ConfigError(f"{args.crds}: no {', '.join(missing)} (--crds is the folder of the KubeRay CRD files)")
        docs = {p: load_manifest(p) for p in args.manifests}
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    # Every manifest is checked once; a RayJob also against each standing RayCluster that is valid.
    problems_of = {p: manifest_problems(d, args.crds) for p, d in docs.items() if d.get("kind") != "RayJob"}
    standing = [d["spec"] for p, d in docs.items() if d.get("kind") == "RayCluster" and not problems_of[p]]
    problems_of.update({p: manifest_problems(d, args.crds, standing) for p, d in docs.items()
                        if d.get("kind") == "RayJob"})
    bad = 0
    for path in docs:
        problems = problems_of[path]
        bad += bool(problems)
        for problem in problems:
            print(f"{path}: {problem}")
    print(f"{len(docs) - bad}/{len(docs)} manifests OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
