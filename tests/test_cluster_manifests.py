"""cluster/*.yaml: rendered from cluster/render.py, valid against the KubeRay v1 CRDs (strict), and
every job's actors fit a worker group."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from simmerge_ray import job_entrypoint, kuberay
from job_entry import load_entry  # beside this file

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "cluster").glob("*.yaml"))
HEAVY_STAGES = {"features", "probe", "label", "merge", "fit", "pipeline", "plan_batch"}


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def _standing_cluster() -> dict:
    return _load("raycluster.yaml")["spec"]


def test_manifests_are_what_render_py_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("cluster_render", REPO / "cluster" / "render.py")
    render = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "cluster_render", render)  # dataclasses look their module up
    spec.loader.exec_module(render)
    rendered = render.render()
    assert sorted(rendered) == [p.name for p in MANIFESTS]
    stale = [name for name, text in rendered.items() if (REPO / "cluster" / name).read_text() != text]
    assert stale == [], "run: python cluster/render.py"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_and_placeable(path: Path, crd_dir: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    # A RayJob must fit its own cluster and the standing RayCluster (`ray job submit` there).
    standing = [_standing_cluster()] if doc["kind"] == "RayJob" else []
    assert kuberay.manifest_problems(doc, crd_dir, standing) == []


def test_the_set_of_manifests() -> None:
    docs = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
    jobs = {d["metadata"]["labels"]["simmerge-ray/stage"]: d for d in docs if d["kind"] == "RayJob"}
    assert set(jobs) == HEAVY_STAGES
    for stage, job in jobs.items():
        spec = job["spec"]
        words = shlex.split(spec["entrypoint"])
        assert words[:2] == ["python", f"jobs/{stage}.py"] and (REPO / words[1]).exists()
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["submissionMode"] == "K8sJobMode"
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["working_dir"] and any(p.startswith("simmerge_ray @ ") for p in env["pip"])
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    cluster = _standing_cluster()
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["cpu"]["maxReplicas"] > groups["cpu"]["minReplicas"]
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert [a["import_path"] for a in apps] == ["simmerge_ray.bandit.service:app"]


def test_the_bandit_replica_asks_for_the_serve_group_not_the_head() -> None:
    """A replica that asks 0 CPU may sit on the head (num-cpus 0: the control plane's); its
    CPU ask places it on the `serve` group, under the deployment name the builder binds."""
    from simmerge_ray.bandit.service import BanditIngress

    (service,) = [yaml.safe_load(p.read_text()) for p in MANIFESTS if p.name == "rayservice-bandit.yaml"]
    (bandit,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (deployment,) = bandit["deployments"]
    assert deployment["name"] == BanditIngress.name
    ask = deployment["ray_actor_options"]["num_cpus"]
    cluster = service["spec"]["rayClusterConfig"]
    assert ask > 0 and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (serve_group,) = cluster["workerGroupSpecs"]
    assert serve_group["minReplicas"] >= 1 and float(serve_group["rayStartParams"]["num-cpus"]) >= ask


def test_every_job_runs_a_command_line_its_command_accepts() -> None:
    """Each RayJob's entrypoint, through its job's parser, gives its `simmerge` command a line that
    command's own parser takes (the fit job once passed a --config the job dropped, and fit then
    missed its required --features and --labels), with outputs staged on the shared volume."""
    import contextlib
    import io

    from simmerge_ray import resources
    from simmerge_ray.cli import build_parser

    entry = load_entry()
    cli = build_parser()
    for doc in (yaml.safe_load(p.read_text()) for p in MANIFESTS):
        if doc["kind"] != "RayJob":
            continue
        stage = doc["metadata"]["labels"]["simmerge-ray/stage"]
        args, extra = entry.build_parser(stage).parse_known_args(shlex.split(doc["spec"]["entrypoint"])[2:])
        assert args.staging_dir == "/data/staging", stage
        assert not (args.config and all(step.config is None for step in entry.STAGES[stage].steps)), stage
        asks = resources.resources_from_flags(args, {})
        for step in entry.STAGES[stage].steps:
            argv = entry.command_argv(step, args, extra, "/data/staging/out", asks, args.config)
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    cli.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{stage}: simmerge {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1]}")


def test_the_bandit_service_gets_its_token_from_a_secret() -> None:
    """Every pod of the RayService (the builder and the replicas may run on any) reads
    SIMMERGE_BANDIT_TOKEN from the Secret; no other manifest carries it; the import path is a
    builder that exists (tests/test_bandit_service.py deploys it)."""
    from simmerge_ray.bandit.auth import TOKEN_ENV

    want = [{"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": "simmerge-bandit-token", "key": "token"}}}]
    for path in MANIFESTS:
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]
        pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        envs = [p["template"]["spec"]["containers"][0].get("env") for p in pods]
        assert envs == [want if doc["kind"] == "RayService" else None] * len(pods), path.name
        assert TOKEN_ENV not in path.read_text() or doc["kind"] == "RayService"
    (service,) = [yaml.safe_load(p.read_text()) for p in MANIFESTS if p.name == "rayservice-bandit.yaml"]
    (bandit,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, attr = bandit["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert "token" not in json.dumps(bandit["args"])  # the secret never sits in the manifest


# ---- the checks themselves must catch what they are for ----------------------------------------

def test_bogus_field_is_rejected_only_by_the_strict_schema(crd_dir: Path) -> None:
    doc = _load("raycluster.yaml")
    doc["spec"]["enableInTreeAutoscalling"] = True  # typo
    doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["gpuz"] = 1
    raw = kuberay.load_crd_schema(crd_dir / "ray.io_rayclusters.yaml")
    assert list(jsonschema.Draft7Validator(raw).iter_errors(doc)) == []  # the CRD as is lets both through
    problems = kuberay.manifest_problems(doc, crd_dir)
    assert len(problems) == 2
    assert any("enableInTreeAutoscalling" in p and p.startswith("spec:") for p in problems)
    assert any("gpuz" in p and "workerGroupSpecs.1.template.spec.containers.0" in p for p in problems)


def test_wrong_types_are_rejected(crd_dir: Path) -> None:
    doc = _load("rayjob-merge.yaml")
    doc["spec"]["ttlSecondsAfterFinished"] = "3600"
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 8  # must be a string
    problems = kuberay.manifest_problems(doc, crd_dir)
    assert any(p.startswith("spec.ttlSecondsAfterFinished:") for p in problems)
    assert any("rayStartParams.num-cpus" in p for p in problems)


def test_open_maps_and_metadata_stay_open(crd_dir: Path) -> None:
    doc = _load("rayjob-fit.yaml")
    doc["metadata"]["annotations"] = {"team": "merging"}
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-ray-flag"] = "x"
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]["extra/label"] = "y"
    assert kuberay.manifest_problems(doc, crd_dir) == []


def test_gpu_actor_without_gpu_group_is_caught(crd_dir: Path) -> None:
    doc = _load("rayjob-probe.yaml")
    cpu_group = _standing_cluster()["workerGroupSpecs"][0]
    assert cpu_group["groupName"] == "cpu"
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [copy.deepcopy(cpu_group)]
    problems = kuberay.manifest_problems(doc, crd_dir)
    assert len(problems) == 1
    assert problems[0].startswith("inference actor asking {'num_cpus': 4.0, 'num_gpus': 1.0")
    assert "cpu: 8 CPU, 0 GPU" in problems[0]


def test_gpu_ask_from_runtime_env_is_read() -> None:
    """Asks given as SIMMERGE_* env_vars in the runtime env count like flags; flags win."""
    stage, asks = job_entrypoint.job_asks("python jobs/label.py --config c.yaml --cpus-per-actor 3",
                                   {"SIMMERGE_GPUS_PER_INFERENCE_ACTOR": "2", "SIMMERGE_CPUS_PER_ACTOR": "1"})
    assert stage == "label"
    assert asks["streaming"].num_cpus == 3.0 and asks["inference"].num_gpus == 2.0
    problems = kuberay.placement_problems(asks, _standing_cluster())  # its GPU nodes have 1 GPU each
    assert len(problems) == 1 and problems[0].startswith("inference actor asking {'num_cpus': 1.0, 'num_gpus': 2.0")


def test_memory_and_cpu_asks_are_checked() -> None:
    cluster = _standing_cluster()
    _, fits = job_entrypoint.job_asks("python jobs/merge.py --cpus-per-actor 8 --memory-per-actor 22Gi")
    assert kuberay.placement_problems(fits, cluster) == []
    _, gpu_node = job_entrypoint.job_asks("python jobs/merge.py --cpus-per-actor 8 --memory-per-actor 23Gi")
    assert kuberay.placement_problems(gpu_node, cluster) == []  # only the GPU group's nodes hold it
    _, too_big = job_entrypoint.job_asks("python jobs/merge.py --cpus-per-actor 8 --memory-per-actor 47Gi")
    assert len(kuberay.placement_problems(too_big, cluster)) == 1
    _, too_many = job_entrypoint.job_asks("python jobs/fit.py --cpus-per-actor 9")
    assert len(kuberay.placement_problems(too_many, cluster)) == 1


def test_gpu_requests_must_match_ray_gpus() -> None:
    cluster = copy.deepcopy(_standing_cluster())
    cluster["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = "2"
    problems = kuberay.cluster_problems(cluster)
    assert problems == ["worker group 'gpu': pods get nvidia.com/gpu=1 but Ray is told num-gpus=2"]


def test_entrypoint_that_is_not_a_job_script_is_reported(crd_dir: Path) -> None:
    doc = _load("rayjob-merge.yaml")
    doc["spec"]["entrypoint"] = "python train.py --cpus-per-actor 2"
    assert any("does not run a jobs/<stage>.py script" in p for p in kuberay.manifest_problems(doc, crd_dir))


def test_cli_checks_a_folder(crd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kuberay.main([*map(str, MANIFESTS), "--crds", str(crd_dir)]) == 0
    bad = _load("rayjob-probe.yaml")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"] = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][:0]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert kuberay.main([str(tmp_path / "bad.yaml"), "--crds", str(crd_dir)]) == 1
    assert "fits no group of the cluster (head: 0 CPU, 0 GPU" in capsys.readouterr().out  # the head offers none


def test_a_head_only_cluster_hosts_what_its_head_offers() -> None:
    """A RayCluster of a head alone (no worker groups) is a common small setup: Ray schedules actors
    on the head when its num-cpus is above 0. Every ask was reported as fitting no worker group."""
    cluster = copy.deepcopy(_standing_cluster())
    cluster["workerGroupSpecs"] = []
    (_, asks), = job_entrypoint.entrypoint_jobs("python jobs/merge.py --cpus-per-actor 2")
    assert kuberay.placement_problems(asks, cluster) != []  # the head says num-cpus '0'
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = "4"
    assert kuberay.placement_problems(asks, cluster) == []
    (_, big), = job_entrypoint.entrypoint_jobs("python jobs/merge.py --cpus-per-actor 8")
    assert "fits no group of the cluster (head: 4 CPU" in kuberay.placement_problems(big, cluster)[0]
