"""Reusable buffers for chunk loops: a fresh allocation of a chunk-sized tensor costs a page fault
per 4 KB, more than the arithmetic on it."""

from __future__ import annotations

import numpy as np

from simmerge_ray.lazy_torch import torch


class Scratch:
    """Flat buffers by (key, dtype), grown on demand; one per worker thread (not thread-safe)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._bytes: dict[object, np.ndarray] = {}

    def get(self, key: object, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = torch.float32 if dtype is None else dtype
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < k:
            buf = self._bufs[(key, dtype)] = torch.empty(k, dtype=dtype)
        return buf[:k]

    def bytes(self, key: object, n: int) -> np.ndarray:
        """A byte buffer of n bytes (the torch-free paths: kernels on stored bytes)."""
        buf = self._bytes.get(key)
        if buf is None or buf.nbytes < n:
            buf = self._bytes[key] = np.empty(n, dtype=np.uint8)
        return buf[:n]
