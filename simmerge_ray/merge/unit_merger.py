"""Merging one work unit: read its tensors (or element ranges), merge, write at fixed offsets.

Plain torch and file I/O, no Ray: the same object runs in a thread of the command's own process
(the local placement) or inside a Ray actor (the cluster placement), so both give the same bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import MergeError
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, DTYPE_TO_TORCH, BackgroundWriter, RangeWriter
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import MergeInputs, combine_native, ties_native
from simmerge_ray.merge.operators.magnitude_select import MagnitudeSelect
from simmerge_ray.merge.operators.scratch import Scratch
from simmerge_ray.merge.operators.task_arithmetic import variant_of
from simmerge_ray.merge.piece_routes import PieceRoutes, open_inputs
from simmerge_ray.merge.tensor_merge import NonFiniteError, check_finite, merge_tensor, nonfinite_error
from simmerge_ray.merge.tensor_plan import TensorTask
from simmerge_ray.merge.units import Piece, WorkUnit

Chunks = Callable[[], Iterator[tuple[int, list["torch.Tensor"]]]]


def _prefetched(starts: Sequence[int], read: Callable[[int], list],
                pool: ThreadPoolExecutor) -> Iterator[tuple[int, list]]:
    """(start, read(n)) for each chunk n of `starts`, chunk n + 1 read on `pool` while chunk n
    is used: the reading side of every chunk loop (torch buffers or the kernel's byte buffers)."""
    pending = pool.submit(read, 0)
    for n, start in enumerate(starts):
        parts = pending.result()
        if n + 1 < len(starts):
            pending = pool.submit(read, n + 1)
        yield start, parts


class UnitMerger:
    """Merges work units into preallocated output files; one per worker thread or Ray actor.

    A tensor of a fixed linear combination (linear, task arithmetic) or of TIES and kin is merged
    by a chunk loop over flat buffers: no float32 copy of a whole tensor, and the next chunk is
    read while this one is merged. SLERP and the other whole-tensor methods read the whole tensor
    unless its float32 working set exceeds `stream_bytes` (then SLERP streams too, a first pass
    giving its Gram matrix). A tensor that needs several passes (SLERP's Gram, TIES's magnitude
    threshold) and whose inputs fit in `stream_bytes` is read once and kept for the passes.
    Each tensor computes in its own dtype (TensorTask.compute, fixed by the plan). Which of these
    paths a piece takes is decided by PieceRoutes (piece_routes.py), which the dry run prices.
    """

    def __init__(self, spec: MergeSpec, tasks: dict[str, TensorTask], stream_bytes: int, chunk_elems: int,
                 threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> None:
        if threads is not None:  # a Ray actor owns its process; local threads leave torch as it is
            torch.set_num_threads(max(1, threads))
        self.spec = spec
        self.tasks = tasks
        self.routes = PieceRoutes(spec, tasks, open_inputs(spec), stream_bytes, chunk_elems)
        self.ckpts = self.routes.ckpts
        self.chunk_elems = self.routes.chunk_elems
        self.progress = progress
        self.scratch = Scratch()
        self._read = 0
        self._out_slot = 0

    def run(self, unit: WorkUnit, partial: Mapping[str, Path], allow_nonfinite: bool) -> dict:
        """Merge `unit` into its shard's preallocated file `partial[unit.file]` (its pieces' byte
        ranges only)."""
        t0 = time.perf_counter()
        self._read = 0
        writer = BackgroundWriter(RangeWriter(Path(partial[unit.file])))
        pieces = unit.pieces

        def fetch(i: int):
            # Tensors merged by a chunk loop read their own chunks, never a whole tensor here.
            return None if i >= len(pieces) or self.routes.fused(pieces[i].name) else pool.submit(self._read_inputs, pieces[i].name)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader") as pool:
            pending = fetch(0)
            try:
                for i, piece in enumerate(pieces):
                    if pending is None:
                        self._merge_chunks(piece, writer, allow_nonfinite, pool)
                        self._advance(0, int(piece.last))
                        pending = fetch(i + 1)
                        continue
                    tensors = pending.result()
                    pending = fetch(i + 1)
                    if piece.start != 0 or not piece.last:  # a whole-tensor merge written into a range
                        raise MergeError(f"{piece.name}: a work unit holds elements {piece.start}.."
                                         f"{piece.start + piece.count} of a tensor merged whole (internal error)")
                    merged = merge_tensor(self.spec, self.tasks[piece.name], tensors.__getitem__,
                                          allow_nonfinite=allow_nonfinite)
                    writer.write_at(piece.offset, merged.to(DTYPE_TO_TORCH[piece.dtype]))
                    self._advance(piece.count, 1)
                    del tensors, merged
                writer.close()
            except NonFiniteError as e:
                writer.abort()
                raise NonFiniteError(f"{e}{self._nonfinite_source(e)}") from None
            except BaseException:
                writer.abort()
                raise
        return {"file": unit.file, "pieces": len(pieces), "elements": unit.elems, "bytes_read": self._read,
                "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def _nonfinite_source(self, e: NonFiniteError) -> str:
        """Which input holds NaN/Inf at the merged tensor's first bad element, as a clause of the
        error: a corrupt input is the usual cause, an overflow of the method the other."""
        task = self.tasks.get(e.tensor)
        if task is None or task.vocab is not None or e.first < 0:  # remapped rows: no one index to read
            return ""
        held = [f"{model!r} ({self.ckpts[model].path}, tensor {name!r})" for model, name in dict.fromkeys(task.all_reads)
                if not bool(torch.isfinite(self.ckpts[model].read_range(name, e.first, 1).float()).all())]
        return (f"; input {' and '.join(held)} holds NaN/Inf there" if held
                else "; every input is finite there (the method overflowed)")

    def _advance(self, elements: int, tensors: int = 0) -> None:
        """Report merged elements and finished tensors to the progress bar, if any."""
        if self.progress is not None:
            self.progress(elements, tensors)

    def _buffer(self, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        return self.scratch.get(key, self.chunk_elems, dtype)

    def _chunks(self, piece: Piece, reads: tuple[tuple[str, str], ...], pool: ThreadPoolExecutor,
                passes: int) -> Chunks:
        """A function giving one pass over the piece's chunks: (start, one chunk per read (model,
        tensor) in its stored dtype). With several passes and inputs that fit in `stream_bytes`,
        the inputs are read once and every pass slices them; otherwise each pass reads its
        chunks into reused buffers, the next chunk read while this one is used."""
        chunk, end = self.chunk_elems, piece.start + piece.count
        starts = list(range(piece.start, end, chunk))
        readers = [(self.ckpts[model], name) for model, name in reads]
        nbytes = piece.count * sum(DTYPE_BYTES[ck.entries[name].dtype] for ck, name in readers)
        if self.routes.kept(passes, nbytes):
            whole = [ck.read_range(name, piece.start, piece.count) for ck, name in readers]
            self._read += nbytes

            def sliced():
                for s in starts:
                    yield s, [w[s - piece.start:min(s + chunk, end) - piece.start] for w in whole]

            return sliced

        def read(n: int) -> list[torch.Tensor]:
            start, k = starts[n], min(chunk, end - starts[n])
            parts = [ck.read_range(name, start, k, out=self._buffer(("in", j, n % 2), DTYPE_TO_TORCH[ck.entries[name].dtype]))
                     for j, (ck, name) in enumerate(readers)]
            self._read += k * sum(p.element_size() for p in parts)
            return parts

        return lambda: _prefetched(starts, read, pool)

    def _merge_chunks(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool,
                      pool: ThreadPoolExecutor) -> None:
        """A piece merged by a chunk loop (see `_fused`)."""
        if piece.count == 0:
            return
        lib = self.routes.native(piece)
        if lib is not None:
            self._merge_native(lib, piece, writer, allow_nonfinite, pool)
            return
        kind, passes = self.routes.passes(self.tasks[piece.name])
        chunks = self._chunks(piece, self.tasks[piece.name].all_reads, pool, passes)
        merge = self._merge_combination if kind == "combination" else self._merge_chunked
        merge(piece, writer, allow_nonfinite, chunks, passes)

    @staticmethod
    def _rounded(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """An input chunk rounded to the compute dtype (a no-op when it is float32)."""
        return x if compute == torch.float32 or x.dtype == compute else x.to(compute)

    def _working(self, x: torch.Tensor, task: TensorTask) -> torch.Tensor:
        """An input chunk as the method's function receives it (see working_dtype)."""
        return self._rounded(x, self.routes.compute(task)).to(self.routes.work(task))

    def _write_chunk(self, piece: Piece, writer: BackgroundWriter, start: int, values: torch.Tensor,
                     allow_nonfinite: bool) -> None:
        out_dtype, compute = DTYPE_TO_TORCH[piece.dtype], self.routes.compute(self.tasks[piece.name])
        if out_dtype != compute:  # rounded to the compute dtype first, as mergekit rounds it
            values = values.to(compute)
        self._out_slot ^= 1  # two output buffers: one being written while the other fills
        out = self._buffer(("out", self._out_slot), out_dtype)[:values.numel()].copy_(values)
        if not allow_nonfinite:
            check_finite(out, piece.name, self.spec.method.name, offset=start)
        writer.write_at(piece.offset + (start - piece.start) * DTYPE_BYTES[piece.dtype], out)
        self._advance(values.numel())

    def _merge_combination(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool, chunks: Chunks,
                           passes: int) -> None:
        """sum_i c_i x_i (+ c_b base) in float32 over the piece's elements (then divided, for
        linear), chunk by chunk into reused buffers (a first pass gives SLERP's Gram matrix: the
        piece is the whole tensor)."""
        spec, task = self.spec, self.tasks[piece.name]
        n_src, compute = len(task.reads), self.routes.compute(task)
        gram = None
        if spec.method.combination_needs_gram:  # its first pass: the Gram matrix
            gram = np.zeros((n_src, n_src))
            for _, parts in chunks():
                block = torch.stack([self._rounded(p, compute).double() for p in parts[:n_src]])
                gram += (block @ block.T).numpy()
        coeffs, divisor = self._coefficients(task, gram)
        for start, parts in chunks():
            k = parts[0].numel()
            acc = self._buffer(("acc",), torch.float32)[:k]
            acc.copy_(self._rounded(parts[0], compute)).mul_(coeffs[0])
            for c, x in zip(coeffs[1:], parts[1:]):
                if c != 0:
                    x = self._rounded(x, compute)
                    if x.dtype != torch.float32:  # a same-dtype add is several times faster than a mixed one
                        x = self._buffer(("f32",), torch.float32)[:k].copy_(x)
                    acc.add_(x, alpha=c)
            if divisor != 1.0:
                acc.div_(divisor)
            self._write_chunk(piece, writer, start, acc, allow_nonfinite)

    def _coefficients(self, task: TensorTask, gram: np.ndarray | None) -> tuple[list[float], float]:
        """A combination's coefficient per read (model inputs, then the base when it has one) and
        the divisor of their sum (see MergeMethod.combination_terms; else 1)."""
        method = self.spec.method
        if method.combination_terms is not None:
            return method.combination_terms(task.options, task.per_model)
        coeffs, base_coeff = method.combination(gram, task.options, task.per_model)
        return ([*coeffs, base_coeff] if task.base is not None else list(coeffs)), 1.0

    def _merge_native(self, lib, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool,
                      pool: ThreadPoolExecutor) -> None:
        """_merge_combination by the C kernel on byte buffers: no torch. Zero coefficients after
        the first are dropped, as there."""
        task = self.tasks[piece.name]
        readers = [(self.ckpts[m], t) for m, t in task.all_reads]
        dtypes = [ck.entries[t].dtype for ck, t in readers]
        coeffs, divisor = self._coefficients(task, None)
        keep = [0] + [j for j in range(1, len(coeffs)) if coeffs[j] != 0]
        chunk, end, size = self.chunk_elems, piece.start + piece.count, DTYPE_BYTES[piece.dtype]
        starts = range(piece.start, end, chunk)

        def read(n: int) -> list[np.ndarray]:
            start, k = starts[n], min(chunk, end - starts[n])
            parts = []
            for j, (ck, t) in enumerate(readers):
                buf = self.scratch.bytes(("in", j, n % 2), chunk * DTYPE_BYTES[dtypes[j]])[:k * DTYPE_BYTES[dtypes[j]]]
                ck.read_into(t, start, k, memoryview(buf))
                parts.append(buf)
            self._read += sum(p.nbytes for p in parts)
            return parts

        for start, parts in _prefetched(starts, read, pool):
            k = min(chunk, end - start)
            self._out_slot ^= 1
            out = self.scratch.bytes(("out", self._out_slot), chunk * size)[:k * size]
            bad, first = combine_native.combine(lib, [parts[j] for j in keep], [dtypes[j] for j in keep],
                                                [coeffs[j] for j in keep], task.compute, out, piece.dtype,
                                                check=not allow_nonfinite, divisor=divisor)
            if bad:
                raise nonfinite_error(piece.name, self.spec.method.name, bad, start + first, start, k)
            writer.write_at(piece.offset + (start - piece.start) * size, out)
            self._advance(k)

    def _merge_chunked(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool, chunks: Chunks,
                       passes: int) -> None:
        """TIES and kin on a whole tensor, chunk by chunk: one pass (two for float32) finds each
        sparsified model's magnitude threshold (magnitude_select), the last merges with the masks."""
        spec, task = self.spec, self.tasks[piece.name]
        assert task.base is not None  # TIES & co need a base (MergeMethod.needs_base)
        options, per_model = task.options, task.per_model
        selects = [MagnitudeSelect(piece.count, float(d), bool(options["rescale"]))
                   if float(d) < 1 and spec.method.chunked_masks else None for d in per_model["density"]]
        selecting = any(s is not None for s in selects)
        lib = self.routes.ties_kernel(task, selecting)
        if lib is not None:
            self._merge_fused(lib, piece, writer, allow_nonfinite, chunks, selects, passes)
            return
        if selecting:
            for step in ("first_pass", "second_pass")[:passes - 1]:
                for _, parts in chunks():
                    base = self._working(parts[-1], task)
                    for sel, x in zip(selects, parts):
                        if sel is not None:
                            getattr(sel, step)(self._working(x, task) - base)
        masks = [s.mask() if s is not None else None for s in selects]
        for start, parts in chunks():
            inp = MergeInputs([self._working(x, task) for x in parts[:-1]], self._working(parts[-1], task), per_model,
                              options)
            self._write_chunk(piece, writer, start, spec.method.chunked(inp, masks, scratch=self.scratch),
                              allow_nonfinite)

    def _merge_fused(self, lib, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool, chunks: Chunks,
                     selects: list[MagnitudeSelect | None], passes: int) -> None:
        """_merge_chunked's passes, each one fused loop of the C kernel per chunk."""
        task = self.tasks[piece.name]
        variant = variant_of(self.spec.method)
        for n in range(passes - 1):
            for _, parts in chunks():
                ties_native.histogram_pass(lib, parts[:-1], parts[-1], selects, second=n == 1)
        masks = [s.mask() if s is not None else None for s in selects]
        for start, parts in chunks():
            out = self._buffer(("ties",), self.routes.work(task))[:parts[0].numel()]
            ties_native.merge_chunk(lib, parts[:-1], parts[-1], masks, task.per_model["weight"],
                                    consensus=variant.consensus, normalize=bool(task.options["normalize"]),
                                    lam=float(task.options["lambda"]), out=out)
            self._write_chunk(piece, writer, start, out, allow_nonfinite)

    def _read_inputs(self, name: str) -> dict[tuple[str, str], torch.Tensor]:
        reads = set(self.tasks[name].all_reads)
        tensors = {(model, t): self.ckpts[model].read(t) for model, t in reads}
        self._read += sum(self.ckpts[model].entries[t].nbytes for model, t in reads)
        return tensors
