"""Writes the KubeRay manifests in this folder from one description (run it after editing).

    python cluster/render.py            # rewrite cluster/*.yaml
    python cluster/render.py --check    # exit 1 if a manifest differs from what this file renders

One place holds the image, the worker groups, each stage's resource asks and the runtime env,
so the RayCluster, the RayJobs and the RayService cannot drift apart. The runtime env installs
the project from its archive with pip, which brings the dependencies pyproject.toml lists.
tests/test_cluster_manifests.py checks the result against the KubeRay CRD schemas and checks
that every job's asks fit a worker group.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# Placeholders to adapt per installation -------------------------------------------------------
RAY_VERSION = "2.60.0"
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"  # or a project image with the dependencies baked in
GPU_IMAGE = f"{IMAGE}-gpu"
PROJECT_ARCHIVE = "https://github.com/your-org/simmerge_ray/archive/refs/heads/main.zip"
DATA_PVC = "simmerge-data"  # ReadWriteMany volume holding checkpoints and configs, at /data
OBJECT_STORE_SECRET = "simmerge-object-store"  # optional: AWS_ACCESS_KEY_ID, ... for s3:// outputs
BANDIT_TOKEN_SECRET = "simmerge-bandit-token"  # required by the RayService: key `token`, the write token
ARTIFACTS = "s3://simmerge-artifacts"
# Outputs bound for ARTIFACTS are written here first, by the driver on the head and by actors on
# the workers alike, so it must be the volume every pod mounts; a failed job's work stays here for
# the same job to pick up.
STAGING = "--staging-dir /data/staging"
GIB = 2**30


@dataclass(frozen=True)
class Group:
    """A worker group: pod size, Ray resources it advertises, autoscaling bounds."""

    name: str
    cpus: int
    memory_gib: int  # container limit
    ray_memory_gib: int  # what actors may reserve (Ray's `memory` resource)
    object_store_gib: int
    gpus: int = 0
    min_replicas: int = 0
    max_replicas: int = 4


CPU = Group("cpu", cpus=8, memory_gib=32, ray_memory_gib=22, object_store_gib=8, max_replicas=8)
GPU = Group("gpu", cpus=8, memory_gib=64, ray_memory_gib=46, object_store_gib=16, gpus=1, max_replicas=4)
SERVE = Group("serve", cpus=2, memory_gib=8, ray_memory_gib=5, object_store_gib=2, min_replicas=1, max_replicas=2)

STREAMING_ASK = "--cpus-per-actor 2 --memory-per-actor 6Gi"
INFERENCE_ASK = "--gpus-per-inference-actor 1 --cpus-per-inference-actor 4 --memory-per-inference-actor 24Gi"


@dataclass(frozen=True)
class Job:
    stage: str
    args: str
    groups: tuple[Group, ...]


JOBS = (
    Job("probe", f"--config /data/catalog.yaml --out {ARTIFACTS}/probe {INFERENCE_ASK} --max-actors 4",
        (GPU,)),
    Job("features", f"--config /data/catalog.yaml --out {ARTIFACTS}/features {STREAMING_ASK} "
                    "--gpus-per-inference-actor 0.5 --cpus-per-inference-actor 2 "
                    "--memory-per-inference-actor 16Gi --max-actors 8", (CPU, GPU)),
    Job("label", f"--config /data/catalog.yaml --out {ARTIFACTS}/labels {STREAMING_ASK} {INFERENCE_ASK}",
        (CPU, GPU)),
    Job("merge", f"--config /data/configs/merge.yaml --out {ARTIFACTS}/merged/example {STREAMING_ASK} "
                 "--max-actors 16", (CPU,)),
    # Planning actors are light (1 CPU, 2 Gi: the selector, Gram matrices and feature table);
    # the pool grows from 1 to --max-actors with the backlog and the cpu group follows it.
    Job("plan_batch", f"--config /data/requests.parquet --out {ARTIFACTS}/plans --selector /data/selector "
                      "--catalog /data/catalog.yaml --features /data/features --cache /data/plan-cache "
                      "--cpus-per-actor 1 --memory-per-actor 2Gi --max-actors 32", (CPU,)),
    # Each Ray Tune trial and Ray Train worker reserves the streaming ask.
    Job("fit", f"--features /data/features --labels /data/labels/labels.parquet --out {ARTIFACTS}/selector "
               "--cpus-per-actor 4 --memory-per-actor 8Gi", (CPU,)),
    Job("pipeline", f"--config /data/configs/pipeline.yaml --out {ARTIFACTS}/pipeline {STREAMING_ASK} "
                    f"{INFERENCE_ASK}", (CPU, GPU)),
)

# An application builder: `app(args: dict) -> serve.Application`, over the state folder args["state"].
BANDIT_IMPORT_PATH = "simmerge_ray.bandit.service:app"
BANDIT_STATE = "/data/bandit/state"
BANDIT_DEPLOYMENT = "BanditIngress"  # the deployment the builder binds (simmerge_ray/bandit/service.py)
SERVE_REPLICA_CPUS = 0.5  # light: it relays requests to the bandit actor
# The builder and the replicas read the token from this variable, set on every pod of the service.
BANDIT_TOKEN_ENV = [{"name": "SIMMERGE_BANDIT_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": BANDIT_TOKEN_SECRET, "key": "token"}}}]


def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The project as working_dir (for jobs/) and as a pip requirement (pulls its dependencies)."""
    env: dict = {"working_dir": PROJECT_ARCHIVE, "pip": [f"simmerge_ray @ {PROJECT_ARCHIVE}"]}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def node_types(groups: tuple[Group, ...]) -> str:
    """SIMMERGE_NODE_TYPES of a job on these groups: what one node of each offers Ray, and how
    many the autoscaler may start. simmerge_ray.placement checks every actor's ask against it
    before submitting work (Ray's autoscaler does not tell the job which node types it can add)."""
    return json.dumps({g.name: {"CPU": g.cpus, "GPU": g.gpus, "memory": g.ray_memory_gib * GIB,
                                "max_count": g.max_replicas} for g in groups}, separators=(",", ":"))


def _container(name: str, image: str, cpus: int, memory_gib: int, gpus: int = 0,
               ports: list[dict] | None = None, env: list[dict] | None = None) -> dict:
    amount = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    container = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(amount), "limits": dict(amount)},
        **({"env": env} if env else {}),
        "envFrom": [{"secretRef": {"name": OBJECT_STORE_SECRET, "optional": True}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if ports:
        container["ports"] = ports
    return container


def _pod(container: dict, gpus: int = 0) -> dict:
    spec: dict = {
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}}],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "simmerge-ray"}}, "spec": spec}


def head_group(serve: bool = False) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    if serve:
        ports.append({"containerPort": 8000, "name": "serve"})
    return {
        # num-cpus 0: no actor lands on the head, so losing a worker never takes the driver with it.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(_container("ray-head", IMAGE, 2, 8, ports=ports, env=BANDIT_TOKEN_ENV if serve else None)),
    }


def worker_group(g: Group, env: list[dict] | None = None) -> dict:
    params = {
        "num-cpus": str(g.cpus),
        "memory": str(g.ray_memory_gib * GIB),
        "object-store-memory": str(g.object_store_gib * GIB),
    }
    if g.gpus:
        params["num-gpus"] = str(g.gpus)
    return {
        "groupName": g.name,
        "replicas": g.min_replicas,
        "minReplicas": g.min_replicas,
        "maxReplicas": g.max_replicas,
        "rayStartParams": params,
        "template": _pod(_container("ray-worker", GPU_IMAGE if g.gpus else IMAGE, g.cpus, g.memory_gib, g.gpus,
                                    env=env), g.gpus),
    }


def cluster_spec(groups: tuple[Group, ...], serve: bool = False) -> dict:
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "512Mi"}},
        },
        "headGroupSpec": head_group(serve),
        "workerGroupSpecs": [worker_group(g, BANDIT_TOKEN_ENV if serve else None) for g in groups],
    }


def _meta(name: str, **labels: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "simmerge-ray", **labels}}


def raycluster() -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta("simmerge"),
            "spec": cluster_spec((CPU, GPU))}


def rayjob(job: Job) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(f"simmerge-{job.stage.replace('_', '-')}", **{"simmerge-ray/stage": job.stage}),
        "spec": {
            "entrypoint": f"python jobs/{job.stage}.py {job.args} {STAGING}",
            "runtimeEnvYAML": yaml.safe_dump(runtime_env({"SIMMERGE_NODE_TYPES": node_types(job.groups)}),
                                             sort_keys=False, width=4096),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 0,
            "rayClusterSpec": cluster_spec(job.groups),
        },
    }


def rayservice() -> dict:
    serve_config = {
        "applications": [{
            "name": "bandit",
            "import_path": BANDIT_IMPORT_PATH,
            "route_prefix": "/",
            "args": {"state": BANDIT_STATE},  # the builder's arguments
            "runtime_env": runtime_env(),
            # The replica asks for CPU so it is placed on the `serve` group, not on the head (which
            # offers none, so the head keeps to the control plane); the bandit actor it starts
            # follows it there (start_bandit_actor: detached, node affinity).
            "deployments": [{"name": BANDIT_DEPLOYMENT, "ray_actor_options": {"num_cpus": SERVE_REPLICA_CPUS}}],
        }],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta("simmerge-bandit"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster_spec((SERVE,), serve=True),
        },
    }


def manifests() -> dict[str, dict]:
    """File name -> manifest."""
    out = {"raycluster.yaml": raycluster()}
    out.update({f"rayjob-{j.stage.replace('_', '-')}.yaml": rayjob(j) for j in JOBS})
    out["rayservice-bandit.yaml"] = rayservice()
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, serveConfigV2) as readable `|` blocks; a value shared by
    several pods is written out in each, not as a YAML alias."""

    def ignore_aliases(self, data: object) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))

HEADER = "# Generated by cluster/render.py: edit that file and rerun it, not this one.\n"


def render() -> dict[str, str]:
    return {name: HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=4096)
            for name, doc in manifests().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = [name for name, text in render().items()
             if not (HERE / name).exists() or (HERE / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"cluster/{name} is stale: run python cluster/render.py", file=sys.stderr)
        return 1 if stale else 0
    for name, text in render().items():
        (HERE / name).write_text(text)
    print(f"wrote {len(render())} manifests to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
