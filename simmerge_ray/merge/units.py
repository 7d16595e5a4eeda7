"""How a merge is cut up: output shards, and work units of tensors or element ranges (pure planning).

The output's shards and, from the safetensors layout, the byte offset of every output tensor are
fixed before anything is merged, so any worker can write any unit at its offsets and the output
bytes do not depend on the number of workers, their placement or retries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.checkpoint_files import SINGLE_FILE
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, FLOAT_DTYPES, dtype_code, promoted, tensor_nbytes
from simmerge_ray.merge.tensor_plan import TensorTask


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, out dtype code)


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + count) of one output tensor, written at file offset `offset`."""

    name: str
    start: int
    count: int
    dtype: str  # output dtype code
    offset: int
    last: bool = True  # the tensor's last range: merging it finishes the tensor (progress counts it)


@dataclass(frozen=True)
class WorkUnit:
    file: str  # the shard's file name
    pieces: tuple[Piece, ...]

    @property
    def elems(self) -> int:
        return sum(p.count for p in self.pieces)


def plan_units(shards: list[ShardPlan], layouts: dict, split: Callable[[str], bool], unit_elems: int) -> list[WorkUnit]:
    """Cut every shard into units of about `unit_elems` elements, in file order.

    A tensor larger than a unit for which `split(name)` holds (an elementwise method on a tensor
    it streams, see executor.plan_merge) is cut into element ranges; any other is one piece (SLERP
    needs the whole tensor's Gram matrix, TIES/DARE rank or sample over it, a vocabulary remap
    reads whole rows). Units never span two files.
    """
    units: list[WorkUnit] = []
    for shard in shards:
        offsets = layouts[shard.file].offsets
        cur: list[Piece] = []
        size = 0
        for name, shape, code in shard.tensors:
            numel = int(np.prod(shape, dtype=np.int64))
            step = unit_elems if numel > unit_elems and split(name) else max(numel, 1)
            for start in range(0, max(numel, 1), step):
                k = min(step, numel - start)
                if cur and size + k > unit_elems:
                    units.append(WorkUnit(shard.file, tuple(cur)))
                    cur, size = [], 0
                cur.append(Piece(name, start, k, code, offsets[name] + start * DTYPE_BYTES[code], start + k >= numel))
                size += k
        if cur:
            units.append(WorkUnit(shard.file, tuple(cur)))
    return units


def plan_shards(tasks: list[TensorTask], ckpts: dict[str, Checkpoint], out_dtype: str | None,
                shard_bytes: int) -> list[ShardPlan]:
    """Group output tensors, in output order, into shards of about `shard_bytes`."""
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for task in tasks:
        model, in_name = task.all_reads[0]
        name, e = task.name, ckpts[model].entries[in_name]
        code = e.dtype
        if e.dtype in FLOAT_DTYPES:  # without out_dtype/dtype, the inputs' (promoted) dtype, as mergekit writes it
            stored = (ckpts[m].entries[t].dtype for m, t in task.all_reads)
            code = dtype_code(out_dtype) if out_dtype else promoted(stored) or e.dtype
        shape = e.shape if task.vocab is None else (task.vocab.rows, *e.shape[1:])
        nbytes = tensor_nbytes(tuple(shape), code)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tuple(shape), code))
        size += nbytes
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(f, tuple(g)) for f, g in zip(names, groups)]
