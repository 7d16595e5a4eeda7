"""MKL's vendor check (simmerge_ray/mkl_vendor.py): on CPUs it does not take for Intel's (AMD),
torch's MKL runs a generic path unless mkl_vendor.c is preloaded; scripts/mkl_env.sh exports the
preload for every process of the demo and the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
