"""MKL's vendor check (simmerge_ray/mkl_vendor.py): on CPUs it does not take for Intel's (AMD),
torch's MKL runs a generic path unless mkl_vendor.c is preloaded; scripts/mkl_env.sh exports the
preload for every process of the demo and the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster_processes import RAY, free_ports, kill_group, processes_naming, reap, startup_lock
from simmerge_ray.mkl_vendor import SWITCH, libtorch_cpu, mkl_vendor_preload
from simmerge_ray.native import compiler

REPO = Path(__file__).resolve().parents[1]
LIBTORCH = libtorch_cpu()
if not hasattr(LIBTORCH, "mkl_serv_intel_cpu_true"):
    pytest.skip("torch's BLAS is not MKL here: nothing to preload", allow_module_level=True)
RECOGNISED = LIBTORCH.mkl_serv_intel_cpu_true() == 1  # an Intel CPU: MKL dispatches by instruction set already
HAS_CC = compiler() is not None
# MKL's dispatch code in a fresh process (0: its generic path), and a float32 product's largest
# error against float64.
_DISPATCH = """
import torch
from simmerge_ray.mkl_vendor import libtorch_cpu
lib = libtorch_cpu()
g = torch.Generator().manual_seed(0)
a, b = torch.randn(300, 200, generator=g), torch.randn(200, 100, generator=g)
err = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
print(lib.mkl_serv_cpu_detect(), err)
"""


def _dispatch(env: dict[str, str]) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", _DISPATCH], env=env, capture_output=True, text=True, check=True)
    code, err = out.stdout.split()
    return int(code), float(err)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This environment without a preload or the switch, its kernels built under tmp_path."""
    monkeypatch.delenv(SWITCH, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("SIMMERGE_KERNEL_DIR", str(tmp_path / "kernels"))
    return dict(os.environ)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: the preload cannot be built")
def test_the_preload_makes_mkl_dispatch_by_instruction_set(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    path = mkl_vendor_preload()
    if RECOGNISED:
        assert path is None
        return
    assert path is not None and Path(path).parent == tmp_path / "kernels", path
    before, after = _dispatch(env), _dispatch({**env, "LD_PRELOAD": path})
    assert before[0] == 0 and after[0] > 0  # the generic path, then an instruction set's
    assert after[1] < 1e-3  # the same product, to float32 rounding
    monkeypatch.setenv(SWITCH, "0")
    assert mkl_vendor_preload() is None


@pytest.mark.skipif(RECOGNISED or not HAS_CC, reason="nothing to preload, or no compiler to build it")
def test_a_path_ld_preload_cannot_name_is_not_offered(env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """LD_PRELOAD splits on spaces and colons: such a cache folder would give every process an
    ld.so error line and no preload."""
    monkeypatch.setenv("SIMMERGE_KERNEL_DIR", str(tmp_path / "with space"))
    assert mkl_vendor_preload() is None


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: the preload cannot be built")
def test_the_scripts_export_it_for_every_process_and_keep_a_users_preload(env: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """scripts/mkl_env.sh (sourced by demo.sh and test.sh) puts the library first in LD_PRELOAD
    and keeps what the user had there; a process it starts dispatches as the preload makes it."""
    mine = tmp_path / "mine.so"
    script = REPO / "scripts" / "mkl_env.sh"
    twice = f"source {script} && source {script} && echo \"$LD_PRELOAD\""  # from another folder, twice
    out = subprocess.run(["bash", "-c", twice], cwd=tmp_path, env={**env, "LD_PRELOAD": str(mine)},
                         capture_output=True, text=True, check=True)
    preload = out.stdout.strip().split(":")
    path = mkl_vendor_preload()
    assert preload == ([path] if path else []) + [str(mine)]
    if not RECOGNISED:
        assert path is not None and _dispatch({**env, "LD_PRELOAD": path})[0] > 0


# `simmerge` started without the preload: what a command (a merge of a config that is not there:
# one line, exit 2) leaves in the process, what a child it starts gets, and what a process that
# imported torch first gets.
_COMMAND = """
import contextlib, io, os, subprocess, sys
from simmerge_ray.cli import main
with contextlib.redirect_stderr(io.StringIO()):
    assert main(["merge", "absent.yaml", "--out", "merged"]) == 2
child = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True, check=True).stdout
print(os.environ.get("LD_PRELOAD", "-"), child.split()[0])
exec(sys.argv[1])
"""
_TOO_LATE = """
import torch
from simmerge_ray.mkl_vendor import activate, activate_worker
print(activate())
activate_worker()
""" + _DISPATCH


@pytest.mark.skipif(RECOGNISED or not HAS_CC, reason="nothing to preload, or no compiler to build it")
def test_simmerge_takes_it_for_itself_and_the_processes_it_starts(env: dict[str, str], tmp_path: Path) -> None:
    """Run without the scripts, the command computes as under them: MKL's vendor check answered
    from the global symbol scope before torch loads, LD_PRELOAD exported for its children (a local
    Ray's workers); once torch is loaded it is too late, and nothing is loaded or exported."""
    out = subprocess.run([sys.executable, "-c", _COMMAND, _DISPATCH], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    preload, child_code, code, err = out
    assert preload == mkl_vendor_preload() and Path(preload).parent == tmp_path / "kernels"
    assert int(code) > 0 and int(child_code) == int(code) and float(err) < 1e-3
    late = subprocess.run([sys.executable, "-c", _TOO_LATE], env=env, capture_output=True, text=True, check=True)
    assert late.stdout.split()[:2] == ["None", "0"]  # activate() did nothing; MKL's generic path
    assert "keeps MKL's generic kernels: torch was imported before the hook" in late.stderr  # as a worker says
    off = subprocess.run([sys.executable, "-c", _COMMAND, _DISPATCH], env={**env, SWITCH: "0"}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert off[:3] == ["-", "0", "0"]  # nothing exported; the child's and its own generic path


_DRIVER = """
import sys
import ray
from simmerge_ray.mkl_vendor import activate
activate()
from simmerge_ray.ray_session import init_ray
init_ray(sys.argv[1])
@ray.remote
def dispatch():
    import torch
    from simmerge_ray.mkl_vendor import libtorch_cpu
    torch.ones(64, 64) @ torch.ones(64, 64)
    return libtorch_cpu().mkl_serv_cpu_detect()
import torch
from simmerge_ray.mkl_vendor import libtorch_cpu
torch.ones(64, 64) @ torch.ones(64, 64)
print(libtorch_cpu().mkl_serv_cpu_detect(), ray.get(dispatch.remote()))
"""


def test_the_hook_is_named_through_rays_own_variable() -> None:
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from simmerge_ray.mkl_vendor import HOOK_ENV

    assert HOOK_ENV == WORKER_PROCESS_SETUP_HOOK_ENV_VAR


@pytest.mark.skipif(RECOGNISED or not HAS_CC, reason="nothing to preload, or no compiler to build it")
def test_a_clusters_workers_take_it_from_their_driver(env: dict[str, str]) -> None:
    """A cluster whose nodes were started without the preload: the workers of a driver that has
    it take it as they start (Ray's worker setup hook), through the GCS address and through Ray
    Client (`ray://`, where Ray drops the runtime_env's hook field), so both dispatch alike; a
    driver without it (SIMMERGE_MKL_VENDOR=0) leaves them as they are."""
    work = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # short: Ray's socket path limit
    env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with startup_lock():  # every port its own: Ray's defaults are shared with the suite's other clusters
        gcs, client, agent, agent_grpc, env_agent, metrics = free_ports(6)
        head = subprocess.Popen([str(RAY), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                                 f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                                 f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
                                 f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0",
                                 "--num-cpus=1", f"--temp-dir={work}", "--object-store-memory=100000000",
                                 "--disable-usage-stats"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its daemons share the process group head.pid
        started, _ = head.communicate(timeout=120)
    try:
        assert head.returncode == 0, started
        runs = {}
        for name, address, extra in (("with", f"127.0.0.1:{gcs}", {}), ("client", f"ray://127.0.0.1:{client}", {}),
                                     ("without", f"127.0.0.1:{gcs}", {SWITCH: "0"})):
            # Ray Client's per-client server fails to start 1 run in 5-8 here, with or without the hook
            # (grpc's epoll_wait EBADF, or a zombie the proxy asks for its command line): connect again.
            for _ in range(3):
                out = subprocess.run([sys.executable, "-c", _DRIVER, address], env={**env, **extra},
                                     capture_output=True, text=True, timeout=180)
                if "Initialization failure from server" not in out.stderr:
                    break
            logs = "".join(f"\n{f.name}: {f.read_text()[-800:]}" for f in work.glob("session_2*/logs/*client_server*"))
            assert out.returncode == 0, out.stderr[-2000:] + logs  # Ray Client's own logs, where it failed
            runs[name] = [int(v) for v in out.stdout.split()]
    finally:
        kill_group(head.pid, processes_naming(work))
        assert not reap(work)
    assert runs["with"][0] > 0 and runs["with"][1] == runs["with"][0] and runs["client"] == runs["with"]
    assert runs["without"] == [0, 0]
