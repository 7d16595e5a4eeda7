"""MKL's vendor check: on CPUs it does not take for Intel's (AMD), torch's MKL runs a generic path
unless mkl_vendor.c is preloaded; a local Ray started by the commands preloads it into its
processes, where the training and inference run."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simmerge_ray.native import MKL_VENDOR_SWITCH, mkl_vendor_preload

LIBTORCH = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
# MKL's dispatch code for this process (0: its generic path), and a float32 product checked
# against float64, in a fresh process with the given environment.
_DISPATCH = """
import ctypes, pathlib, torch
lib = ctypes.CDLL(str(pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
g = torch.Generator().manual_seed(0)
a, b = torch.randn(300, 200, generator=g), torch.randn(200, 100, generator=g)
err = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
print(lib.mkl_serv_cpu_detect(), err)
"""


def _recognised() -> bool:
    """Whether MKL takes this CPU for an Intel one (so there is nothing to preload)."""
    return ctypes.CDLL(str(LIBTORCH)).mkl_serv_intel_cpu_true() == 1


def _dispatch(env: dict[str, str]) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", _DISPATCH], env=env, capture_output=True, text=True, check=True)
    code, err = out.stdout.split()
    return int(code), float(err)


def test_the_preload_makes_mkl_dispatch_by_instruction_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIMMERGE_KERNEL_DIR", str(tmp_path))
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    path = mkl_vendor_preload()
    if _recognised():
        assert path is None  # an Intel CPU: MKL already dispatches by instruction set
        return
    assert path is not None and Path(path).parent == tmp_path, path
    before, after = _dispatch(plain), _dispatch({**plain, "LD_PRELOAD": path})
    assert before[0] == 0 and after[0] > 0  # the generic path, then an instruction set's
    assert after[1] < 1e-3  # the same product, to float32 rounding
    monkeypatch.setenv(MKL_VENDOR_SWITCH, "0")
    assert mkl_vendor_preload() is None


_LOCAL_RAY = """
import ctypes, os, pathlib, ray
from simmerge_ray.ray_session import init_ray
init_ray(num_cpus=1)

@ray.remote
def dispatch():
    import torch
    lib = ctypes.CDLL(str(pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    return lib.mkl_serv_cpu_detect()

print(ray.get(dispatch.remote()), os.environ.get("LD_PRELOAD", "-"))
"""


def test_a_local_ray_runs_its_workers_with_the_preload(tmp_path: Path) -> None:
    """The worker's MKL dispatches as a process with the preload does; the driver's own
    environment (what it starts later) is as it was."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LD_PRELOAD")} | {
        "RAY_AUTH_MODE": "disabled", "SIMMERGE_KERNEL_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _LOCAL_RAY], env=env, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    worker, driver_preload = out.stdout.split()
    path = mkl_vendor_preload()
    want = _dispatch({**env, "LD_PRELOAD": path} if path else env)[0]
    assert int(worker) == want and driver_preload == "-"
    if not _recognised():
        assert want > 0
