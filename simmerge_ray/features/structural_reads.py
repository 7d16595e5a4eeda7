"""Streaming reads of the structural pass and the worker that folds them into Gram matrices.

Plain torch and memory maps: `GramWorker` becomes a Ray actor in structural.py, which holds the
Ray plumbing; here nothing imports Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from simmerge_ray.features import gram_kernel
from simmerge_ray.features.gram_math import GramAccumulator
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.safetensors_format import DTYPE_BYTES


class ChunkReader:
    """Streams the same element range of one tensor from several checkpoints, in stored dtypes.

    Each byte of each tensor is read once, `chunk_elems` values per checkpoint at a time, as
    zero-copy views of the memory-mapped shards; the pages of each step are unmapped once the
    consumer asks for the next, so memory stays at a few chunks however large the tensor is.
    """

    def __init__(self, ckpts: Sequence[Checkpoint], chunk_elems: int) -> None:
        self.ckpts = list(ckpts)
        self.chunk_elems = chunk_elems
        self.bytes_read = [0] * len(self.ckpts)

    def raw_chunks(self, tensor: str, numel: int | None = None) -> Iterator[list[torch.Tensor]]:
        """Yield, per step, each checkpoint's next `chunk_elems` values in their stored dtype
        (valid until the next step), over the tensor's first `numel` values (default: all)."""
        stored = [ck.stored_name(tensor) for ck in self.ckpts]  # a tied head: its embedding
        entries = [ck.stored_entry(tensor) for ck in self.ckpts]
        numel = entries[0].numel if numel is None else numel
        for start in range(0, numel, self.chunk_elems):
            k = min(self.chunk_elems, numel - start)
            parts = [ck.map_range(n, start, k) for ck, n in zip(self.ckpts, stored)]
            for i, e in enumerate(entries):
                self.bytes_read[i] += k * DTYPE_BYTES[e.dtype]
            yield parts
            del parts
            for ck, n in zip(self.ckpts, stored):
                ck.release_range(n, start, k)


class GramWorker:
    """One actor of the pool: streams its tensors and returns small matrices."""

    def __init__(self, paths: Sequence[str], ref: int, cols: Sequence[int], signed: bool,
                 chunk_elems: int, precision: str, cpus: float, numels: dict[str, int] | None = None) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.ckpts = [Checkpoint.open(p) for p in paths]
        self.ref, self.cols, self.signed, self.chunk_elems = ref, list(cols), signed, chunk_elems
        self.precision = precision
        self.numels = numels or {}  # vocabulary tensors of models of different vocabulary sizes: shared rows
        gram_kernel.load()  # built or loaded at start-up, not inside the first tensor

    def gram(self, tensors: Sequence[str]) -> list[dict]:
        """The Gram blocks of a batch of tensors (one call per batch: per-call overhead, paid in
        the driver on the same cores, stays small next to the streaming)."""
        return [self._one(t) for t in tensors]

    def _one(self, tensor: str) -> dict:
        t0 = time.perf_counter()
        numel = self.numels.get(tensor, self.ckpts[0].stored_entry(tensor).numel)
        reader = ChunkReader(self.ckpts, min(self.chunk_elems, numel))
        acc = GramAccumulator(len(self.ckpts), self.ref, self.cols, self.signed, precision=self.precision)
        for parts in reader.raw_chunks(tensor, numel):
            acc.add_parts(parts)
        gram, agree, disagree = acc.result()
        return {"tensor": tensor, "gram": gram, "agree": agree, "disagree": disagree,
                "bytes_read": reader.bytes_read, "seconds": time.perf_counter() - t0}


