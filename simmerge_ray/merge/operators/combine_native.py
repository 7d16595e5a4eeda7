"""The combination kernel (combine_kernel.c): sum_i c_i x_i of one chunk, without torch.

Why: the executor's linear combinations (linear, task arithmetic in float32) are memory-bound
sums that need no tensor library, and importing torch costs 3-4 s here, as long as merging
3 GB. The kernel reads and writes numpy buffers of the stored bytes and gives the torch path's
bytes (tests check both against each other). Without a compiler, or with
SIMMERGE_COMBINE_KERNEL=0, the executor takes the torch path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simmerge_ray import native
from simmerge_ray.io.safetensors_format import DTYPE_BYTES

SOURCE = Path(__file__).with_name("combine_kernel.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off", "-fno-trapping-math")
CODES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors dtype code -> the kernel's
MAX_INPUTS = 64  # as combine_kernel.c
_P = ctypes.c_void_p


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.load_library(SOURCE, FLAGS, "SIMMERGE_COMBINE_KERNEL", "linear merges use the torch path")
    if lib is None:
        return None
    lib.combine.argtypes = [ctypes.c_int, _P, _P, _P, ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, _P, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.combine.restype = ctypes.c_int64
    return lib


def usable(lib: ctypes.CDLL | None, compute: str, stored: Sequence[str], out: str) -> bool:
    """Whether the kernel covers a tensor: float32/bf16/fp16 inputs, output and compute dtype."""
    return (lib is not None and compute in CODES and out in CODES and 0 < len(stored) <= MAX_INPUTS
            and all(d in CODES for d in stored))


def combine(lib: ctypes.CDLL, parts: Sequence[np.ndarray], dtypes: Sequence[str], coeffs: Sequence[float],
            compute: str, out: np.ndarray, out_dtype: str, *, check: bool, divisor: float = 1.0) -> tuple[int, int]:
    """out = sum_i coeffs[i] * parts[i] / divisor (see combine_kernel.c for the rounding); `parts` hold the
    stored bytes of k elements each, `out` room for k elements of `out_dtype`.
    Returns (non-finite values, index of the first) when `check`, else (0, -1). See `usable`."""
    k = out.nbytes // DTYPE_BYTES[out_dtype]
    first = ctypes.c_int64(-1)
    bad = lib.combine(len(parts), (ctypes.c_int * len(parts))(*[CODES[d] for d in dtypes]),
                      (_P * len(parts))(*[p.ctypes.data for p in parts]),
                      (ctypes.c_float * len(parts))(*coeffs), divisor, k, CODES[compute], int(compute != "F32"),
                      CODES[out_dtype], out.ctypes.data, int(check), ctypes.byref(first))
    return int(bad), int(first.value)
