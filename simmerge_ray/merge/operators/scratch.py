"""Reusable buffers for chunk loops: a fresh allocation of a chunk-sized tensor costs a page fault
per 4 KB, more than the arithmetic on it."""

from __future__ import annotations

import torch


class Scratch:
    """Flat buffers by (key, dtype), grown on demand; one per worker thread (not thread-safe)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: object, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < k:
            buf = self._bufs[(key, dtype)] = torch.empty(k, dtype=dtype)
        return buf[:k]
