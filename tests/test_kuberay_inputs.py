"""Bad input to the offline KubeRay manifest check (`python -m simmerge_ray.kuberay`) and to the
jobs/ entry scripts: one line naming the file, field or option at fault, or one problem per
manifest; nothing written that the command did not create. Real files, no Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from input_checks import one_line_error, tree_hash

from simmerge_ray import job_entrypoint, kuberay

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())


def _check(capsys: pytest.CaptureFixture, crd_dir: Path, *paths: Path) -> tuple[int, list[str]]:
    """Exit status and the problem lines of the CLI run on `paths` (stderr must be empty)."""
    status = kuberay.main([*map(str, paths), "--crds", str(crd_dir)])
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out, err
    return status, out.splitlines()[:-1]


def _write(path: Path, *docs: object) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


# ---- files of several documents, as `kubectl apply -f` takes them -------------------------------

def test_every_document_of_a_multi_document_file_is_checked(tmp_path: Path, crd_dir: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A `---` separated file (what kubectl applies) was refused as "not valid YAML"; now each
    document is checked and named by its number."""
    bad = _load("rayjob-probe.yaml")
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"] = []
    good = _write(tmp_path / "good.yaml", _load("raycluster.yaml"), _load("rayjob-merge.yaml"))
    assert _check(capsys, crd_dir, good) == (0, [])
    path = _write(tmp_path / "all.yaml", _load("raycluster.yaml"), bad, _load("rayjob-merge.yaml"))
    status, problems = _check(capsys, crd_dir, path)
    assert status == 1 and problems and all(p.startswith(f"{path} (document 2): ") for p in problems), problems
    # A Deployment beside a RayJob is reported, not skipped as checked.
    path.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n"
                    + (REPO / "cluster" / "rayjob-merge.yaml").read_text())
    status, problems = _check(capsys, crd_dir, path)
    assert status == 1 and problems == [f"{path} (document 1): kind 'Deployment' is not one of "
                                        f"['RayCluster', 'RayJob', 'RayService']"]


def test_a_file_of_no_documents_or_of_a_non_mapping_document_is_one_line(
        tmp_path: Path, crd_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "seps.yaml").write_text("---\n---\n")
    (tmp_path / "second.yaml").write_text((REPO / "cluster" / "rayjob-merge.yaml").read_text() + "---\n- a\n")
    (tmp_path / "folder.yaml").mkdir()
    for name, needle in (("seps.yaml", "no YAML document"), ("second.yaml", "(document 2)"),
                         ("folder.yaml", "cannot read")):
        assert kuberay.main([str(tmp_path / name), "--crds", str(crd_dir)]) == 2
        one_line_error(capsys, str(tmp_path / name), needle)


# ---- fields the check read wrongly or not at all ------------------------------------------------

def _job(spec_edit=None, doc_edit=None, name: str = "rayjob-merge.yaml") -> dict:
    doc = _load(name)
    if spec_edit:
        spec_edit(doc["spec"])
    if doc_edit:
        doc_edit(doc)
    return doc


def _worker(spec: dict) -> dict:
    return spec["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("edit, named", [
    # each was a traceback (ValueError, TypeError, AttributeError), exit 1
    (lambda d: _worker(d["spec"])["rayStartParams"].update({"num-gpus": "lots"}), "rayStartParams.num-gpus 'lots'"),
    (lambda d: _worker(d["spec"])["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        {"nvidia.com/gpu": "1k"}), "nvidia.com/gpu limit '1k'"),
    (lambda d: d.update({"kind": ["RayJob"]}), "kind ['RayJob']"),
    (lambda d: d["spec"].update({"runtimeEnvYAML": "env_vars: [a, b]\n"}), "spec.runtimeEnvYAML: env_vars"),
    # each passed: `ray start --memory/--num-cpus` take whole numbers, Ray's env_vars only strings,
    # and the check reads the v1 schema only
    (lambda d: _worker(d["spec"])["rayStartParams"].update({"memory": "22Gi"}), "rayStartParams.memory '22Gi'"),
    (lambda d: _worker(d["spec"])["rayStartParams"].update({"num-cpus": "500m"}), "rayStartParams.num-cpus '500m'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "0.5"}),
     "group 'head': rayStartParams.num-cpus '0.5'"),
    (lambda d: d["spec"].update({"runtimeEnvYAML": "env_vars: {SIMMERGE_MAX_ACTORS: 4}\n"}),
     "spec.runtimeEnvYAML: env_vars must map names to strings"),
    (lambda d: d.update({"apiVersion": "apps/v1"}), "apiVersion 'apps/v1'"),
    (lambda d: d.pop("apiVersion"), "apiVersion None"),
    # was "entrypoint '' does not run a jobs/<stage>.py script"
    (lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint is missing"),
], ids=["num-gpus", "gpu-limit", "kind-list", "env-list", "memory-unit", "millicpu", "head-cpus",
        "env-int", "api-version", "no-api-version", "no-entrypoint"])
def test_a_bad_field_is_one_problem_naming_it(edit, named: str, tmp_path: Path, crd_dir: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    doc = _load("rayjob-merge.yaml")
    edit(doc)
    status, problems = _check(capsys, crd_dir, _write(tmp_path / "job.yaml", doc))
    assert status == 1 and len(problems) == 1 and named in problems[0], problems


def test_a_bad_serve_config_is_one_problem(tmp_path: Path, crd_dir: Path, capsys: pytest.CaptureFixture) -> None:
    for config in ("applications: {a: 1}\n", "applications: [1]\n"):  # were AttributeError tracebacks
        doc = _load("rayservice-bandit.yaml")
        doc["spec"]["serveConfigV2"] = config
        status, problems = _check(capsys, crd_dir, _write(tmp_path / "svc.yaml", doc))
        assert status == 1 and problems == [f"{tmp_path / 'svc.yaml'}: serveConfigV2: applications must be a "
                                            f"list of applications, each with an import_path"], problems


# ---- the entrypoint as the job's shell runs it ---------------------------------------------------

@pytest.mark.parametrize("entrypoint", [
    "SIMMERGE_CPUS_PER_ACTOR=64 python jobs/merge.py --config c.yaml",  # the prefix was ignored
    'bash -c "python jobs/merge.py --config c.yaml --cpus-per-actor 64"',  # "does not run a jobs/ script"
    "cd /app && exec python jobs/merge.py --cpus-per-actor=64",
    "python jobs/merge.py --config c.yaml; python jobs/fit.py --cpus-per-actor 64",  # the second was not read
])
def test_every_job_of_a_shell_entrypoint_is_checked_with_its_own_asks(entrypoint: str) -> None:
    jobs = job_entrypoint.entrypoint_jobs(entrypoint, {"SIMMERGE_CPUS_PER_ACTOR": "2"})
    assert jobs[-1][1]["streaming"].num_cpus == 64.0
    problems = kuberay.placement_problems(jobs[-1][1], _load("raycluster.yaml")["spec"])
    assert len(problems) == 1 and "fits no group of the cluster" in problems[0]


def test_flags_after_a_shell_operator_belong_to_the_next_command() -> None:
    """`... jobs/merge.py && echo --cpus-per-actor 64` gave the merge job 64 CPUs."""
    ((stage, asks),) = job_entrypoint.entrypoint_jobs("python jobs/merge.py --cpus-per-actor 2 && echo --cpus-per-actor 64")
    assert stage == "merge" and asks["streaming"].num_cpus == 2.0


# ---- jobs/: --staging-dir ----------------------------------------------------------------------

def _job_run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_staging_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """--staging-dir naming a file: a NotADirectoryError traceback, exit 1."""
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels: []\n")
    before = tree_hash(tmp_path)
    proc = _job_run(tmp_path, "--config", "merge.yaml", "--out", f"file://{tmp_path}/out",
                    "--staging-dir", "merge.yaml")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["jobs/merge.py: error: --staging-dir merge.yaml: cannot hold the "
                                                "staging folder (Not a directory)"]
    assert tree_hash(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["merge.yaml"]


def test_a_refused_job_leaves_no_staging_folder_it_made(tmp_path: Path) -> None:
    """A command that refused its config left the --staging-dir folders the job had created (empty)."""
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels: []\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "other").write_text("not the job's")
    proc = _job_run(tmp_path, "--config", "merge.yaml", "--out", f"file://{tmp_path}/out",
                    "--staging-dir", "shared/staging/simmerge")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["merge.yaml", "shared", "shared/other"]


@pytest.mark.parametrize("entrypoint, stages, cpus", [
    # a `#` inside a word is no comment: the flags after `run#2` were dropped (1 CPU asked)
    ("python jobs/merge.py --out s3://b/run#2 --cpus-per-actor 8", ["merge"], 8.0),
    # a multi-line entrypoint is one command per line: label got merge's flags, merge went unchecked
    ("python jobs/label.py --cpus-per-actor 2\npython jobs/merge.py --cpus-per-actor 64", ["label", "merge"], 64.0),
    # `bash -lc` as `bash -c` (it was "does not run a jobs/<stage>.py script")
    ('bash -lc "cd /app && python jobs/merge.py --cpus-per-actor 8"', ["merge"], 8.0),
    # `export` for the commands after it, `env VAR=x` for its own: both were ignored
    ("export SIMMERGE_CPUS_PER_ACTOR=8; python jobs/merge.py", ["merge"], 8.0),
    ("env SIMMERGE_CPUS_PER_ACTOR=8 python jobs/merge.py", ["merge"], 8.0),
    ("# run the merge\npython jobs/merge.py --cpus-per-actor 8  # eight", ["merge"], 8.0),
])
def test_shell_forms_of_an_entrypoint_are_read_as_its_shell_runs_them(entrypoint: str, stages: list[str],
                                                                       cpus: float) -> None:
    jobs = job_entrypoint.entrypoint_jobs(entrypoint)
    assert [stage for stage, _ in jobs] == stages
    assert jobs[-1][1]["streaming"].num_cpus == cpus
