"""MKL's vendor check, taken out of the way on CPUs it does not take for Intel's.

torch's CPU wheels link MKL, which runs a generic path on CPUs it does not recognise (AMD's). A
process started with mkl_vendor.c in LD_PRELOAD gets MKL's kernels for its instruction set
instead: on a 2-core AMD EPYC with AVX-512 the default zoo's llama trained 14-20% and scored 24%
faster (benchmarks/bench_mkl_vendor.py; README, Performance). The preload acts at process start
and every process of a run must have it or none (a Ray worker and its driver must compute the
same bytes), so it is set for whole process trees: `scripts/mkl_env.sh`, which the demo and
test scripts source, exports what `python -m simmerge_ray.mkl_vendor` prints. Results change in
their last bits with the kernels, as they do between Intel CPUs of different instruction sets.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from simmerge_ray.native import build_library

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("mkl_vendor.c")
SWITCH = "SIMMERGE_MKL_VENDOR"  # "0": no preload


def mkl_vendor_preload() -> str | None:
    """The absolute path of the library to preload, or None where it would change nothing (MKL
    already recognises the CPU, torch's BLAS is not MKL), cannot be built (no compiler), could
    not be preloaded (a path with a space or a colon, which LD_PRELOAD separates on) or SWITCH
    is "0". Never raises: it is an optimisation."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        return _build_if_useful()
    except Exception as e:  # noqa: BLE001 - whatever fails here, the run goes on without it
        log.warning("MKL keeps its generic kernels on this CPU (%s: %s)", type(e).__name__, e)
        return None


def libtorch_cpu() -> ctypes.CDLL:
    """torch's CPU library, where MKL is linked (its dispatch: `mkl_serv_cpu_detect()`, 0 for the
    generic path). Raises OSError where it is not there, AttributeError on a missing function."""
    import torch

    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))


def _build_if_useful() -> str | None:
    try:
        recognised = libtorch_cpu().mkl_serv_intel_cpu_true() == 1
    except (OSError, AttributeError):  # not MKL, or not linked this way: nothing to do
        return None
    if recognised:
        return None
    path = build_library(SOURCE, ("-shared", "-fPIC", "-O2"), SWITCH, "MKL keeps its generic kernels on this CPU")
    if path is None:
        return None
    path = path.resolve()
    if any(c in str(path) for c in " :"):
        log.warning("%s: LD_PRELOAD cannot name a path with a space or a colon; MKL keeps its generic kernels "
                    "(set SIMMERGE_KERNEL_DIR to another folder)", path)
        return None
    return str(path)


if __name__ == "__main__":
    print(mkl_vendor_preload() or "")
