"""The fused TIES kernel (ties_kernel.c) behind the chunk loop of TIES and task arithmetic.

Why C: torch spends about twenty sweeps over memory per chunk (subtract, mask, weight, elect,
count, divide, round), the kernel one per pass; the bytes are the same, as the tests check
against the torch path and mergekit. It covers the common case (compute dtype bf16 or float32,
inputs stored in it, no l1 rescaling); everything else, and SIMMERGE_TIES_KERNEL=0, takes the
torch path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from pathlib import Path

from simmerge_ray.lazy_torch import torch

from simmerge_ray import native
from simmerge_ray.merge.operators.magnitude_select import MagnitudeMask, MagnitudeSelect
from simmerge_ray.merge.operators.task_arithmetic import weight_divisor, weights_in

SOURCE = Path(__file__).with_name("ties_kernel.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off", "-fno-trapping-math")
_P = ctypes.c_void_p


def _code(dtype: torch.dtype) -> int:
    """The kernel's dtype argument: 0 float32, 1 bfloat16."""
    return 0 if dtype == torch.float32 else 1


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = native.load_library(SOURCE, FLAGS, "SIMMERGE_TIES_KERNEL", "TIES merges use the slower torch path")
    if lib is None:
        return None
    lib.ties_hist.argtypes = [ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int64, _P, _P]
    lib.ties_hist.restype = None
    lib.ties_hist_low.argtypes = [ctypes.c_int, _P, _P, ctypes.c_int64, _P, _P]
    lib.ties_hist_low.restype = None
    lib.ties_merge.argtypes = [ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int64, _P, _P, _P, _P, ctypes.c_int,
                               ctypes.c_int, ctypes.c_float, ctypes.c_float, _P]
    lib.ties_merge.restype = ctypes.c_int
    return lib


def _ptrs(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*[t.data_ptr() for t in tensors])


def _ints(values: Sequence[int], ctype=ctypes.c_int) -> ctypes.Array:
    return (ctype * len(values))(*values)


def histogram_pass(lib: ctypes.CDLL, xs: Sequence[torch.Tensor], base: torch.Tensor,
                   selects: Sequence[MagnitudeSelect | None], second: bool) -> None:
    """One chunk of the first (or, float32 only, second) pass of every model's MagnitudeSelect."""
    n, k = len(xs), base.numel()
    if not second:
        hist = torch.zeros((n, 1 << 16), dtype=torch.int64)
        lib.ties_hist(_code(base.dtype), n, _ptrs(xs), base.data_ptr(), k,
                      _ints([s is not None for s in selects]), hist.data_ptr())
        for i, s in enumerate(selects):
            if s is not None:
                s.add_counts(hist[i], base.dtype)
        return
    buckets = [s.low_bucket() if s is not None else -1 for s in selects]
    low = torch.zeros((n, 1 << 16), dtype=torch.int64)
    lib.ties_hist_low(n, _ptrs(xs), base.data_ptr(), k, _ints(buckets), low.data_ptr())
    for i, s in enumerate(selects):
        if s is not None:
            s.add_low_counts(low[i])


def merge_chunk(lib: ctypes.CDLL, xs: Sequence[torch.Tensor], base: torch.Tensor,
                masks: Sequence[MagnitudeMask | None], weights: Sequence[float], *, consensus: bool,
                normalize: bool, lam: float, out: torch.Tensor) -> torch.Tensor:
    """TIES (or plain task arithmetic) of one chunk into `out` (the compute dtype), masks advanced
    past the ties this chunk kept, as MagnitudeMask.apply advances them."""
    wb = weights_in(weights, base.dtype)
    ties = _ints([m.ties if m is not None else 0 for m in masks], ctypes.c_int64)
    rc = lib.ties_merge(_code(base.dtype), len(xs), _ptrs(xs), base.data_ptr(), base.numel(),
                        _ints([m is not None for m in masks]),
                        (ctypes.c_float * len(xs))(*[m.value if m is not None else 0.0 for m in masks]),
                        ties, (ctypes.c_float * len(xs))(*wb), int(consensus), int(normalize),
                        weight_divisor(wb, base.dtype), lam, out.data_ptr())
    if rc != 0:
        raise ValueError(f"TIES kernel: {len(xs)} models is more than it takes")
    for m, left in zip(masks, ties):
        if m is not None:
            m.ties = int(left)
    return out


def usable(lib: ctypes.CDLL | None, compute: torch.dtype, stored: Sequence[torch.dtype],
           masks_rescale: bool) -> bool:
    """The kernel covers this tensor: a kernel, a bf16/float32 compute dtype every input is
    stored in, and no l1 rescaling."""
    return lib is not None and compute in (torch.float32, torch.bfloat16) and all(d == compute for d in stored) and not masks_rescale
