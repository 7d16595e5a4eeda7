"""The fused Gram-pass kernel (gram_kernel.c): built on first use, loaded through ctypes.

Why C and not torch: the pass is memory-bound work that torch would do in four sweeps (convert,
centre, multiply, count signs); the kernel does it in one, at several times the speed (see
benchmarks/bench_structural.py). It is compiled for the host CPU with the system C compiler, once per
(source, compiler, CPU) and cached under `SIMMERGE_KERNEL_DIR` (default
~/.cache/simmerge_ray/kernels). Without a compiler, or with SIMMERGE_GRAM_KERNEL=0, `load()`
returns None and callers use the torch path, which gives the same numbers.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from simmerge_ray import native

SOURCE = Path(__file__).with_name("gram_kernel.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it is disabled or cannot be built (logged once)."""
    lib = native.load_library(SOURCE, FLAGS, "SIMMERGE_GRAM_KERNEL", "structural features use the slower torch path")
    if lib is None:
        return None
    fn = lib.gram_chunk
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, p, p, ctypes.c_int64, ctypes.c_int, ctypes.c_int, p, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, p, p, p, p, p]
    fn.restype = ctypes.c_int
    lib.gram_kernel_layout.argtypes = [ctypes.POINTER(ctypes.c_int)] * 4
    lib.gram_kernel_layout.restype = None
    return lib


@functools.cache
def layout(lib: ctypes.CDLL) -> tuple[int, int, int, int]:
    """(block columns, mask words per row, tile size, maximum rows) of the loaded binary."""
    vals = [ctypes.c_int() for _ in range(4)]
    lib.gram_kernel_layout(*[ctypes.byref(v) for v in vals])
    return tuple(v.value for v in vals)  # type: ignore[return-value]


class KernelState:
    """Scratch space and argument arrays for one accumulator's calls (reused across chunks)."""

    def __init__(self, lib: ctypes.CDLL, rows: int, ref: int, cols: list[int], float32: bool) -> None:
        block, words, tile, _ = layout(lib)  # more rows than the kernel takes: rejected by the call
        self.fn, self.rows, self.ref, self.float32 = lib.gram_chunk, rows, ref, int(float32)
        self.cols = np.asarray(cols, dtype=np.int32)
        self.all_cols = int(list(cols) == list(range(rows)))
        rpad, cpad = -(-rows // tile) * tile, -(-len(cols) // tile) * tile
        self.scratch = np.zeros((rpad + 1) * block + 4 * rpad * cpad, np.float64)
        self.masks = np.zeros(2 * rows * words, np.uint64)
        self.ptrs = (ctypes.c_void_p * rows)()
        self.codes = np.zeros(rows, np.int32)

    def add(self, parts: list[torch.Tensor], gram: np.ndarray, agree: np.ndarray, disagree: np.ndarray,
            signed: bool) -> None:
        """Fold one step of `parts` (one flat tensor per row, equal lengths) into the sums."""
        k = parts[0].numel()
        keep = []  # converted copies stay alive until the call returns
        for i, p in enumerate(parts):
            if p.dtype not in DTYPE_CODES:  # f16 and others: exact in float32
                p = p.to(torch.float32)
            p = p.contiguous()
            keep.append(p)
            self.ptrs[i] = p.data_ptr()
            self.codes[i] = DTYPE_CODES[p.dtype]
        rc = self.fn(self.rows, self.ptrs, self.codes.ctypes.data, k, self.ref, len(self.cols),
                     self.cols.ctypes.data, self.all_cols, int(signed), self.float32, gram.ctypes.data, agree.ctypes.data,
                     disagree.ctypes.data, self.scratch.ctypes.data, self.masks.ctypes.data)
        if rc != 0:
            raise ValueError(f"Gram kernel rejected {self.rows} rows, reference {self.ref}, columns {self.cols}")
