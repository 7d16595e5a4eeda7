"""How each piece of a merge is merged, decided from the plan and the inputs' headers alone:
whole tensor or chunk loop, how many passes, inputs kept between passes or read again, which C
kernel (if any) runs it, and what that costs. The unit merger follows these decisions and
`simmerge merge --dry-run` prices them, so the estimate and the merge cannot drift apart."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, DTYPE_TO_TORCH
from simmerge_ray.lazy_torch import torch
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import combine_native, ties_native
from simmerge_ray.merge.operators.task_arithmetic import variant_of
from simmerge_ray.merge.tensor_merge import working_dtype
from simmerge_ray.merge.tensor_plan import TensorTask
from simmerge_ray.merge.units import Piece, WorkUnit


def open_inputs(spec: MergeSpec, pending: Mapping[str, Checkpoint] | None = None) -> dict[str, Checkpoint]:
    """Every input's index and config (headers only), by the config's model reference; a
    reference in `pending` (an earlier merge's output, not written yet: a dry run's
    PendingCheckpoint) is that stand-in."""
    pending = pending or {}
    return {m.ref: pending[m.ref] if m.ref in pending else Checkpoint.open(m.path) for m in spec.inputs}


class PieceRoutes:
    """The route of every piece of one merge (see the module docstring). `stream_bytes` bounds
    the float32 working set of a tensor read whole; `chunk_elems` is the chunk loops' step."""

    def __init__(self, spec: MergeSpec, tasks: dict[str, TensorTask], ckpts: dict[str, Checkpoint],
                 stream_bytes: int, chunk_elems: int) -> None:
        self.spec = spec
        self.tasks = tasks
        self.ckpts = ckpts
        self.stream_bytes = stream_bytes
        self.chunk_elems = max(1, chunk_elems)

    @staticmethod
    def compute(task: TensorTask) -> torch.dtype:
        """The dtype the tensor computes in (TensorTask.compute)."""
        return DTYPE_TO_TORCH[task.compute]

    def work(self, task: TensorTask) -> torch.dtype:
        """The dtype the method's function receives for the tensor (see working_dtype)."""
        return working_dtype(self.spec, self.compute(task))

    def uses_torch(self, units: list[WorkUnit]) -> bool:
        """Whether merging `units` needs torch: not when every piece is a combination the C
        kernel runs (a linear merge: torch is then never imported)."""
        return any(self.native(p) is None for u in units for p in u.pieces)

    def fused(self, name: str) -> bool:
        """Merge with a chunk loop: always for a fixed linear combination (linear, task
        arithmetic) and for TIES and kin (each model's magnitude threshold is found by chunk
        passes first); for SLERP when the tensor's float32 working set exceeds the budget (its
        coefficients need a first pass over the chunks for the Gram matrix)."""
        method = self.spec.method
        if self.tasks[name].vocab is not None:  # rows remapped to the output vocabulary: whole
            return False
        if method.elementwise or method.chunked is not None:
            return True
        if method.combination is None:
            return False
        reads = self.tasks[name].all_reads
        numel = self.ckpts[reads[0][0]].entries[reads[0][1]].numel
        return 4 * numel * (len(reads) + 2) > self.stream_bytes

    def piece_cost(self, piece: Piece) -> tuple[int, int, str]:
        """(bytes read, peak bytes held, kind) of merging `piece`: what `simmerge merge
        --dry-run` reports. kind: "combination" (a fixed linear combination), "chunked" (TIES
        and kin), "whole" (one whole tensor at a time)."""
        task = self.tasks[piece.name]
        sizes = [DTYPE_BYTES[self.ckpts[m].entries[t].dtype] for m, t in task.all_reads]
        stored = piece.count * sum(sizes)
        if not self.fused(piece.name):
            return stored, stored + 4 * piece.count * (len(sizes) + 2), "whole"
        chunk = min(self.chunk_elems, piece.count)
        buffers = chunk * (2 * sum(sizes) + 2 * DTYPE_BYTES[piece.dtype] + 4 * (len(sizes) + 8))
        kind, passes = self.passes(task)
        if self.kept(passes, stored):
            return stored, stored + buffers, kind
        return passes * stored, buffers, kind

    def passes(self, task: TensorTask) -> tuple[str, int]:
        """(kind, passes over the inputs) of a tensor merged by a chunk loop: "combination" (a
        fixed linear combination; SLERP's Gram matrix takes a first pass) or "chunked" (TIES and
        kin; one threshold pass per sparsified model, two in float32)."""
        method = self.spec.method
        if method.combination is not None and not self.rounds_inside(task):
            return "combination", 2 if method.combination_needs_gram else 1
        selecting = method.chunked_masks and any(float(d) < 1 for d in task.per_model["density"])
        work_bytes = DTYPE_BYTES[task.compute] if method.native_dtype else 4
        return "chunked", 1 + (2 if work_bytes == 4 else 1) * selecting

    def kept(self, passes: int, nbytes: int) -> bool:
        """Inputs read once and kept for every pass: several passes, and they fit in stream_bytes."""
        return passes > 1 and nbytes <= self.stream_bytes

    def rounds_inside(self, task: TensorTask) -> bool:
        """The method computes in a half-precision compute dtype (task arithmetic in bf16): its
        float32 combination would skip mergekit's intermediate rounding, so the chunked form runs."""
        method = self.spec.method
        return method.native_dtype and task.compute != "F32" and method.chunked is not None

    def native(self, piece: Piece) -> ctypes.CDLL | None:
        """The combination kernel when it merges `piece` (a combination without a Gram pass,
        safetensors inputs, dtypes it covers, SIMMERGE_COMBINE_KERNEL not 0), else None."""
        task = self.tasks[piece.name]
        if not self.fused(piece.name) or self.passes(task) != ("combination", 1):
            return None
        if not all(self.ckpts[m].is_safetensors for m, _ in task.all_reads):
            return None
        lib = combine_native.load()
        stored = [self.ckpts[m].entries[t].dtype for m, t in task.all_reads]
        return lib if combine_native.usable(lib, task.compute, stored, piece.dtype) else None

    def ties_kernel(self, task: TensorTask, selecting: bool) -> ctypes.CDLL | None:
        """The fused TIES kernel when it covers this tensor (see ties_native.usable), else None."""
        if variant_of(self.spec.method) is None or self.work(task) != self.compute(task):
            return None
        lib = ties_native.load()
        stored = [DTYPE_TO_TORCH[self.ckpts[m].entries[t].dtype] for m, t in task.all_reads]
        rescaled = selecting and bool(task.options["rescale"])
        return lib if ties_native.usable(lib, self.work(task), stored, rescaled) else None
