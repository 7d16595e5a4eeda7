"""Bad inputs to the cluster-facing entry points (jobs/, storage URIs, the KubeRay manifest check)
fail in one line with exit 2, run as the user runs them: real processes, real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("dlopen(")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_manifest_check_names_a_missing_unparsable_or_non_mapping_file(tmp_path: Path, crd_dir: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [RayJob\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- kind: RayJob\n")
    for name in ("missing.yaml", "bad.yaml", "empty.yaml", "list.yaml"):
        proc = _run("-m", "simmerge_ray.kuberay", name, "--crds", str(crd_dir), cwd=tmp_path)
        _one_line_error(proc, name)
    good = REPO / "cluster" / "rayjob-merge.yaml"
    proc = _run("-m", "simmerge_ray.kuberay", str(good), "--crds", str(tmp_path / "no-crds"), cwd=tmp_path)
    _one_line_error(proc, "no-crds", "--crds")


def _edited(tmp_path: Path, name: str, edit) -> Path:
    doc = yaml.safe_load((REPO / "cluster" / "rayjob-merge.yaml").read_text())
    edit(doc["spec"])
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_manifest_check_reports_bad_fields_as_problems_not_tracebacks(tmp_path: Path, crd_dir: Path) -> None:
    """Fields the checks read beyond the CRD schema: each is one problem line naming it (exit 1)."""
    def group(spec: dict) -> dict:
        return spec["rayClusterSpec"]["workerGroupSpecs"][0]

    cases = {
        "no-min.yaml": (lambda s: group(s).pop("minReplicas"), "minReplicas"),
        "cpu.yaml": (lambda s: group(s)["rayStartParams"].update({"num-cpus": "lots"}), "'lots'"),
        "containers.yaml": (lambda s: group(s)["template"]["spec"].update({"containers": []}), "containers"),
        "env.yaml": (lambda s: s.update({"runtimeEnvYAML": "env_vars: [\n"}), "runtimeEnvYAML"),
        "quote.yaml": (lambda s: s.update({"entrypoint": 'python jobs/merge.py "open'}), "No closing quotation"),
    }
    for name, (edit, named) in cases.items():
        path = _edited(tmp_path, name, edit)
        proc = _run("-m", "simmerge_ray.kuberay", str(path), "--crds", str(crd_dir), cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        problems = [line for line in proc.stdout.splitlines() if line.startswith(f"{path}: ")]
        assert len(problems) == 1 and named in problems[0], (name, proc.stdout)


def test_a_relative_or_host_file_uri_is_refused_not_written_under_the_current_folder(tmp_path: Path) -> None:
    """fsspec read file://rel/out as ./rel/out and file://localhost/x as ./localhost/x."""
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels: []\n")
    for uri in ("file://rel/out", f"file://localhost{tmp_path}/out"):
        proc = _run(str(REPO / "jobs" / "merge.py"), "--config", "merge.yaml", "--out", uri,
                    "--staging-dir", str(tmp_path / "staging"), cwd=tmp_path)
        _one_line_error(proc, uri, "file:///")
    proc = _run(str(REPO / "jobs" / "merge.py"), "--config", "file://rel/merge.yaml", "--out", str(tmp_path / "o"),
                cwd=tmp_path)
    _one_line_error(proc, "file://rel/merge.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_a_uri_whose_filesystem_cannot_start_here_is_one_line(tmp_path: Path) -> None:
    """hdfs:// without a JVM: pyarrow raises OSError (was a traceback, exit 1)."""
    proc = _run(str(REPO / "jobs" / "merge.py"), "--config", "merge.yaml", "--out", "hdfs://namenode/out",
                "--staging-dir", str(tmp_path / "staging"), cwd=tmp_path)
    _one_line_error(proc, "hdfs://namenode/out")
    assert list(tmp_path.iterdir()) == []


def test_a_file_uri_output_inside_an_input_is_refused_before_staging(tmp_path: Path) -> None:
    """--out file:///.../model-a/merged was staged, then uploaded into the input model-a; a plain
    path there was refused. The job now tells the command where the output is published."""
    from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

    spec = dict(architecture="llama", hidden_size=16, num_layers=1, num_heads=2, vocab_size=32)
    make_checkpoint(tmp_path / "model-a", SyntheticSpec(**spec, seed=1))
    make_checkpoint(tmp_path / "model-b", SyntheticSpec(**spec, seed=2))
    before = sorted(p.name for p in (tmp_path / "model-a").iterdir())
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {tmp_path / m}\n    parameters: {{weight: 0.5}}\n" for m in ("model-a", "model-b")))
    for out, overwrite, needle in ((f"file://{tmp_path}/model-a/merged", [], "lies inside the input"),
                                   (f"file://{tmp_path}", ["--overwrite"], "holds the input")):
        proc = _run(str(REPO / "jobs" / "merge.py"), "--config", "merge.yaml", "--out", out, *overwrite,
                    "--staging-dir", str(tmp_path / "staging"), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        error = next(line for line in proc.stderr.splitlines() if "error:" in line)
        assert f"the output {needle} {tmp_path / 'model-a'}" in error and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "model-a").iterdir()) == before
