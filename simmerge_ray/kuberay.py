"""Offline checks of KubeRay manifests: CRD schema (strict) and whether each job's actors can land.

The Kubernetes API server validates a RayCluster, RayJob or RayService against the JSON schema in
its CRD, but it silently prunes fields the schema does not declare, so a misspelt key is lost
rather than reported. `strict_schema()` closes every object the CRD does not leave open, so a
typo is an error here. `placement_problems()` takes the asks of a RayJob's entrypoint
(`python jobs/<stage>.py ...`, read the way the job itself reads it: simmerge_ray/job_entrypoint.py)
and checks that each actor role of that stage fits some worker group, e.g. that a GPU inference
actor has a GPU group to land on.

    python -m simmerge_ray.kuberay cluster/*.yaml --crds ../shared/kuberay
"""

from __future__ import annotations

import copy
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simmerge_ray import resources
from simmerge_ray.arg_parser import Parser
from simmerge_ray.errors import ConfigError
from simmerge_ray.job_entrypoint import entrypoint_jobs

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# Ray's default split of a node's memory when rayStartParams has no `memory`: about 30% goes to
# the object store, the rest is what actors can reserve.
RAY_DEFAULT_MEMORY_SHARE = 0.7
API_VERSION = "ray.io/v1"  # the CRD version whose schema is checked
# rayStartParams that `ray start` parses as whole numbers (KubeRay passes them as --KEY=VALUE).
_RAY_START_INTS = ("num-cpus", "num-gpus", "memory", "object-store-memory")


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


def _group_name(group: dict) -> str:
    return str(group.get("groupName", "head"))


def _ray_start_int(group: dict, key: str) -> int | None:
    """rayStartParams[key] as `ray start --KEY` reads it: a whole number (memory in bytes), or None."""
    value = group.get("rayStartParams", {}).get(key)
    if value is None:
        return None
    if not re.fullmatch(r"\s*[0-9]+\s*", str(value)):
        unit = " of bytes, e.g. 23622320128" if "memory" in key else ""
        raise ConfigError(f"group {_group_name(group)!r}: rayStartParams.{key} {value!r} is not a whole number"
                          f"{unit} (`ray start --{key}` takes only that; the pod would not start)")
    return int(value)


def _gpu_count(value: Any, *, what: str) -> float:
    if not re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", str(value)):
        raise ConfigError(f"{what} {value!r} is not a GPU count (e.g. 0, 1)")
    return float(value)


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


CRD_MAX_REPLICAS = 2**31 - 1  # a worker group's maxReplicas when it sets none (the RayCluster CRD's default)


def group_capacity(group: dict) -> Capacity:
    """Ray's view of a group's node: group `resources` > rayStartParams > the container's limits."""
    override = group.get("resources", {})
    container = _first_container(group)
    limits = {**container.get("resources", {}).get("requests", {}), **container.get("resources", {}).get("limits", {})}

    name = _group_name(group)
    start = {key: _ray_start_int(group, key) for key in _RAY_START_INTS}  # each must parse, read or not
    cpus = override.get("CPU", start["num-cpus"] if start["num-cpus"] is not None else limits.get("cpu", 0))
    gpus = _gpu_count(override["GPU"], what=f"group {name!r}: resources.GPU") if "GPU" in override \
        else start["num-gpus"] if start["num-gpus"] is not None \
        else _gpu_count(limits.get("nvidia.com/gpu", 0), what=f"group {name!r}: nvidia.com/gpu")
    if "memory" in override:
        memory: int | None = resources.parse_bytes(override["memory"], what=f"group {name!r}: resources.memory")
    elif start["memory"] is not None:
        memory = resources.parse_bytes(str(start["memory"]), what=f"group {name!r}: rayStartParams.memory")
    elif "memory" in limits:
        memory = int(RAY_DEFAULT_MEMORY_SHARE * resources.parse_bytes(
            limits["memory"], what=f"group {name!r}: container memory limit"))
    else:
        memory = None
    return Capacity(name, parse_cpu(cpus), float(gpus), memory, int(group.get("maxReplicas", CRD_MAX_REPLICAS)))


def gpu_mismatch(group: dict) -> str | None:
    """A group whose pods request GPUs must advertise the same number to Ray, and vice versa."""
    container = _first_container(group)
    pod_gpus = _gpu_count(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0),
                          what=f"worker group {_group_name(group)!r}: nvidia.com/gpu limit")
    ray_gpus = group_capacity(group).gpus
    if pod_gpus != ray_gpus:
        return (f"worker group {group.get('groupName')!r}: pods get nvidia.com/gpu={pod_gpus:g} "
                f"but Ray is told num-gpus={ray_gpus:g}")
    return None


def placement_problems(asks: dict[str, resources.ResourceAsk], cluster_spec: dict) -> list[str]:
    """One message per actor role that no group of `cluster_spec` can host. The head counts: with
    `num-cpus` above 0 (or unset: its container's CPUs) Ray schedules actors there, and a
    head-only cluster is a common small setup (it was reported as fitting no worker group)."""
    head = cluster_spec.get("headGroupSpec")
    groups = [*([group_capacity({**head, "groupName": "head", "maxReplicas": 1})] if isinstance(head, dict) else []),
              *(group_capacity(g) for g in cluster_spec.get("workerGroupSpecs", []))]
    problems = []
    for role, ask in asks.items():
        if not any(c.fits(ask) for c in groups):
            offered = "; ".join(f"{c.group}: {c.cpus:g} CPU, {c.gpus:g} GPU, "
                                f"{'?' if c.memory is None else f'{c.memory / 2**30:.1f} GiB'}, "
                                f"max {'unbounded' if c.max_replicas == CRD_MAX_REPLICAS else c.max_replicas}"
                                for c in groups) or "no groups"
            problems.append(f"{role} actor asking {ask.ray_options()} fits no group of the cluster ({offered})")
    return problems


def cluster_problems(cluster_spec: dict) -> list[str]:
    head = cluster_spec.get("headGroupSpec", {})
    for key in _RAY_START_INTS:  # the head's `ray start` parses them as the workers' does
        _ray_start_int({"groupName": "head", **head}, key)
    problems = [m for g in cluster_spec.get("workerGroupSpecs", []) if (m := gpu_mismatch(g))]
    for g in cluster_spec.get("workerGroupSpecs", []):
        if g.get("minReplicas", 0) > g.get("maxReplicas", CRD_MAX_REPLICAS):
            problems.append(f"worker group {g['groupName']!r}: minReplicas > maxReplicas")
    return problems


def manifest_problems(doc: dict, crd_dir: Path, job_clusters: list[dict] = ()) -> list[str]:
    """Schema violations and placement problems of one manifest.

    A RayJob's asks are checked against its own rayClusterSpec, and against each cluster spec in
    `job_clusters` (e.g. a standing RayCluster the same entrypoint is submitted to).
    """
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in CRD_FILES:
        return [f"kind {kind!r} is not one of {sorted(CRD_FILES)}"]
    if doc.get("apiVersion") != API_VERSION:
        return [f"apiVersion {doc.get('apiVersion')!r}: a {kind} here is checked against the {API_VERSION} "
                f"schema (write apiVersion: {API_VERSION})"]
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
        apps = _embedded_yaml(spec, "serveConfigV2").get("applications")
        if not isinstance(apps, list) or not apps \
                or not all(isinstance(a, dict) and a.get("import_path") for a in apps):
            problems.append("serveConfigV2: applications must be a list of applications, each with an import_path")
    elif kind == "RayJob":
        env_vars = _embedded_yaml(spec, "runtimeEnvYAML").get("env_vars", {})
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            raise ConfigError(f"spec.runtimeEnvYAML: env_vars must map names to strings (Ray refuses the job "
                              f"otherwise; quote numbers), got {env_vars!r}")
        if not spec.get("entrypoint"):
            raise ConfigError("spec.entrypoint is missing (the `python jobs/<stage>.py ...` the job runs)")
        jobs = entrypoint_jobs(spec["entrypoint"], env_vars)
        clusters = ([spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []) + list(job_clusters)
        if not clusters:
            problems.append("RayJob has no rayClusterSpec and no cluster to check it against")
        for cluster in clusters:
            problems += cluster_problems(cluster)
            for _, asks in jobs:
                problems += placement_problems(asks, cluster)
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


def load_manifests(path: Path) -> list[tuple[str, dict]]:
    """The manifests of one file, as `kubectl apply -f` reads it (documents separated by `---`,
    empty ones skipped), each with the name its problems are reported under: the path, or
    `path (document N)` in a file of several. A missing, unreadable or empty file, or a document
    that is not a mapping, is a ConfigError."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    several = sum(d is not None for d in docs) > 1
    named = []
    for number, doc in enumerate(docs, 1):
        where = f"{path} (document {number})" if several else str(path)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: not a manifest (a YAML mapping with kind, spec)")
        named.append((where, doc))
    if not named:
        raise ConfigError(f"{path}: not a manifest (the file holds no YAML document)")
    return named


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m simmerge_ray.kuberay", description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+", type=Path,
                        help="the RayJob, RayCluster and RayService manifest files (YAML; several documents "
                             "in one file are each checked) to check against the CRDs and each other")
    parser.add_argument("--crds", type=Path, required=True,
                        help="folder with the KubeRay v1 CRD YAML files (ray.io_rayjobs.yaml, ...): the KubeRay "
                             "Helm chart's crds/ folder, or ray-operator/config/crd/bases in the KubeRay "
                             "repository (github.com/ray-project/kuberay)")
    args = parser.parse_args(argv)
    try:
        missing = [f for f in CRD_FILES.values() if not (args.crds / f).is_file()]
        if missing:
            raise ConfigError(f"{args.crds}: no {', '.join(missing)} (--crds is the folder of the KubeRay CRD files)")
        docs = {name: doc for p in dict.fromkeys(args.manifests) for name, doc in load_manifests(p)}
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
