"""The streaming merge executor: work units spread over a pool of Ray actors.

The driver fixes the output's shards and, from the safetensors layout, the byte offset of every
output tensor before anything is merged; it creates each shard file with its header. A work
unit is a run of tensors of one shard, or an element range of one large tensor when the method
is a fixed linear combination, so the pool stays balanced whatever the shard sizes and however
large one tensor is. Each actor opens the inputs' indexes (headers only), reads only its
tensors (by element range), merges, and writes the result at its offsets. The driver then
syncs and renames the shards and writes the small files (index, config, tokenizer). The output
bytes do not depend on the number of workers or on retries.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from simmerge_ray import placement
from simmerge_ray.errors import ray_get
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.checkpoint import SINGLE_FILE, Checkpoint
from simmerge_ray.io.safetensors_format import (
    DTYPE_BYTES, DTYPE_TO_TORCH, FLOAT_DTYPES, TORCH_TO_DTYPE, BackgroundWriter, RangeWriter, dtype_code, file_layout, preallocate,
)
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import MergeInputs
from simmerge_ray.merge.operators.magnitude_select import MagnitudeSelect
from simmerge_ray.merge.output_files import write_side_files
from simmerge_ray.merge.tensor_merge import check_finite, compute_dtype, merge_tensor, working_dtype
from simmerge_ray.merge.tensor_plan import TensorTask, output_layers, plan_tensors
from simmerge_ray.merge.tokenizer import BuiltVocabulary, build_vocabulary
from simmerge_ray.resources import ResourceAsk

# Set by the fault-injection test: the first worker to reach its second unit exits abruptly
# (once, tracked by this marker file), to prove that a lost worker is retried cleanly.
CRASH_ONCE_ENV = "SIMMERGE_TEST_CRASH_ONCE"


@dataclass(frozen=True)
class ExecOptions:
    workers: int = 2
    cpus_per_worker: float = 1.0
    memory_per_worker: int | None = None  # bytes, a Ray scheduling hint
    shard_bytes: int = 512 * 1024**2
    # Linear combinations (linear, task arithmetic) are merged in chunks of chunk_elems
    # elements, and so are SLERP and TIES for a tensor whose float32 working set (inputs +
    # output) exceeds stream_bytes. 1M elements keeps a chunk's buffers in the L2/L3 caches: 1.5x
    # faster than 8M on this machine's EPYC, and a few MB per worker.
    stream_bytes: int = 256 * 1024**2
    chunk_elems: int = 1024**2
    # Elements per work unit; None: about a quarter of each worker's share, at least 16M.
    unit_elems: int | None = None
    # Merge in this process, one unit after another, without Ray: no cluster start-up for a
    # local single-worker merge, and no retries (a crash ends the command). Same bytes.
    in_process: bool = False
    allow_nonfinite: bool = False
    overwrite: bool = False
    max_retries: int = 3  # restarts of a lost worker (its process or its node), and retries of its unit
    # Custom Ray resources each worker asks for, to place the merge on nodes that advertise them
    # (`ray start --resources '{"nvme": 4}'`); None: anywhere with CPUs.
    resources: dict[str, float] | None = None
    # The dtype the methods compute in; None: the config's `dtype`, as mergekit (float32 when
    # the config gives none). "float32" computes every method in float32 whatever the config
    # says (`--compute-dtype float32`); the output keeps out_dtype/dtype either way.
    compute_dtype: str | None = None


@dataclass
class MergeResult:
    out: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    units: int = 0
    per_unit: list[dict] = field(default_factory=list)

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


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


@dataclass(frozen=True)
class WorkUnit:
    file: str  # the shard's file name
    pieces: tuple[Piece, ...]

    @property
    def elems(self) -> int:
        return sum(p.count for p in self.pieces)


def plan_units(shards: list[ShardPlan], layouts: dict, split: bool, unit_elems: int) -> list[WorkUnit]:
    """Cut every shard into units of about `unit_elems` elements, in file order.

    With `split` (an elementwise method, see MergeMethod.elementwise) a tensor larger than a
    unit is cut into element ranges; otherwise it is one piece (SLERP needs the whole tensor's
    Gram matrix, TIES/DARE rank or sample over it). Units never span two files.
    """
    units: list[WorkUnit] = []
    for shard in shards:
        offsets = layouts[shard.file].offsets
        cur: list[Piece] = []
        size = 0
        for name, shape, code in shard.tensors:
            numel = int(np.prod(shape, dtype=np.int64))
            step = unit_elems if split and numel > unit_elems else max(numel, 1)
            for start in range(0, max(numel, 1), step):
                k = min(step, numel - start)
                if cur and size + k > unit_elems:
                    units.append(WorkUnit(shard.file, tuple(cur)))
                    cur, size = [], 0
                cur.append(Piece(name, start, k, code, offsets[name] + start * DTYPE_BYTES[code]))
                size += k
        if cur:
            units.append(WorkUnit(shard.file, tuple(cur)))
    return units


def open_inputs(spec: MergeSpec) -> dict[str, Checkpoint]:
    """Every input's index and config (headers only), by the config's model reference."""
    return {m.ref: Checkpoint.open(m.path) for m in spec.inputs}


def input_paths(spec: MergeSpec) -> list[Path]:
    """The folders a merge reads: its output may not be, hold or lie inside any of them."""
    return [m.path for m in spec.inputs]


def plan_shards(tasks: list[TensorTask], ckpts: dict[str, Checkpoint], out_dtype: str | None,
                shard_bytes: int) -> list[ShardPlan]:
    """Group output tensors, in output order, into shards of about `shard_bytes`."""
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for task in tasks:
        model, in_name = task.all_reads[0]
        name, e = task.name, ckpts[model].entries[in_name]
        code = dtype_code(out_dtype) if out_dtype and e.dtype in FLOAT_DTYPES else e.dtype
        shape = e.shape if task.vocab is None else (task.vocab.rows, *e.shape[1:])
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[code]
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tuple(shape), code))
        size += nbytes
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(f, tuple(g)) for f, g in zip(names, groups)]


class UnitMerger:
    """Merges work units; one instance lives in each Ray actor."""

    def __init__(self, spec: MergeSpec, tasks: dict[str, TensorTask], cpus: float, stream_bytes: int,
                 chunk_elems: int, compute: str = "F32") -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.spec = spec
        self.compute = DTYPE_TO_TORCH[compute]
        self.work = working_dtype(spec, self.compute)
        self.tasks = tasks
        self.stream_bytes = stream_bytes
        self.chunk_elems = chunk_elems
        self.ckpts = open_inputs(spec)
        self._units_done = 0
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._out_slot = 0

    def run(self, unit: WorkUnit, path: str, allow_nonfinite: bool) -> dict:
        """Merge `unit` into the preallocated file `path` (its pieces' byte ranges only)."""
        self._maybe_crash()
        t0 = time.perf_counter()
        writer = BackgroundWriter(RangeWriter(Path(path)))
        read_bytes = 0
        pieces = unit.pieces

        def fetch(i: int):
            # Tensors merged by the fused chunk loop read their own chunks, never a whole tensor.
            return None if i >= len(pieces) or self._fused(pieces[i].name) else pool.submit(self._read_inputs, pieces[i].name)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = fetch(0)
            try:
                for i, piece in enumerate(pieces):
                    if pending is None:
                        read_bytes += self._merge_chunks(piece, writer, allow_nonfinite, pool)
                        pending = fetch(i + 1)
                        continue
                    tensors, nbytes = pending.result()
                    pending = fetch(i + 1)
                    merged = merge_tensor(self.spec, self.tasks[piece.name], tensors.__getitem__,
                                          compute=self.compute, allow_nonfinite=allow_nonfinite)
                    writer.write_at(piece.offset, merged.to(DTYPE_TO_TORCH[piece.dtype]))
                    read_bytes += nbytes
                    del tensors, merged
                writer.close()
            except BaseException:
                writer.abort()
                raise
        self._units_done += 1
        return {"file": unit.file, "pieces": len(pieces), "elements": unit.elems, "bytes_read": read_bytes,
                "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def _fused(self, name: str) -> bool:
        """Merge with a chunk loop: always for a fixed linear combination (linear, task
        arithmetic), and when the tensor's float32 working set exceeds the budget for SLERP (its
        coefficients need a first pass over the chunks for the Gram matrix) and TIES (two first
        passes find each model's magnitude threshold)."""
        method = self.spec.method
        if self.tasks[name].vocab is not None:  # rows remapped to the output vocabulary: whole
            return False
        if method.elementwise:
            return True
        if method.combination is None and method.chunked is None:
            return False
        reads = self.tasks[name].all_reads
        numel = self.ckpts[reads[0][0]].entries[reads[0][1]].numel
        return 4 * numel * (len(reads) + 2) > self.stream_bytes

    def _buffer(self, key: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A chunk-sized buffer reused across chunks and tensors: fresh allocations of this size
        cost a page fault per 4 KB, more than the arithmetic on them."""
        buf = self._buffers.get((key, dtype))
        if buf is None:
            buf = self._buffers[(key, dtype)] = torch.empty(self.chunk_elems, dtype=dtype)
        return buf

    def _chunk_passes(self, piece: Piece, reads: tuple[tuple[str, str], ...], pool: ThreadPoolExecutor):
        """A function giving one pass over the piece's chunks: (start, one chunk per read (model,
        tensor) in its stored dtype) into reused buffers, the next chunk read while this one is used."""
        chunk, end = max(1, self.chunk_elems), piece.start + piece.count
        starts = list(range(piece.start, end, chunk))
        readers = [(self.ckpts[model], name) for model, name in reads]

        def read(n: int) -> list[torch.Tensor]:
            start, k = starts[n], min(chunk, end - starts[n])
            return [ck.read_range(name, start, k, out=self._buffer(("in", j, n % 2), DTYPE_TO_TORCH[ck.entries[name].dtype]))
                    for j, (ck, name) in enumerate(readers)]

        def passes():
            pending = pool.submit(read, 0)
            for n in range(len(starts)):
                parts = pending.result()
                if n + 1 < len(starts):
                    pending = pool.submit(read, n + 1)
                yield starts[n], parts

        return passes

    def _pass_bytes(self, piece: Piece, reads: tuple[tuple[str, str], ...]) -> int:
        return piece.count * sum(DTYPE_BYTES[self.ckpts[model].entries[name].dtype] for model, name in reads)

    def _merge_chunks(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool,
                      pool: ThreadPoolExecutor) -> int:
        """A piece merged by a chunk loop (see `_fused`); returns the bytes it read."""
        if piece.count == 0:
            return 0
        if self.spec.method.combination is not None and not self._rounds_inside():
            return self._merge_combination(piece, writer, allow_nonfinite, pool)
        return self._merge_chunked(piece, writer, allow_nonfinite, pool)

    def _rounds_inside(self) -> bool:
        """The method computes in a half-precision compute dtype (task arithmetic in bf16): its
        float32 combination would skip mergekit's intermediate rounding, so the chunked form runs."""
        return self.work != torch.float32 and self.spec.method.chunked is not None

    def _rounded(self, x: torch.Tensor) -> torch.Tensor:
        """An input chunk rounded to the compute dtype (a no-op when it is float32)."""
        return x if self.compute == torch.float32 or x.dtype == self.compute else x.to(self.compute)

    def _write_chunk(self, piece: Piece, writer: BackgroundWriter, start: int, values: torch.Tensor,
                     allow_nonfinite: bool) -> None:
        values = values.to(self.compute)
        if not allow_nonfinite:
            check_finite(values, piece.name, self.spec.method.name, offset=start)
        self._out_slot ^= 1  # two output buffers: one being written while the other fills
        out = self._buffer(("out", self._out_slot), DTYPE_TO_TORCH[piece.dtype])[:values.numel()]
        writer.write_at(piece.offset + (start - piece.start) * DTYPE_BYTES[piece.dtype], out.copy_(values))

    def _merge_combination(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool,
                           pool: ThreadPoolExecutor) -> int:
        """sum_i c_i x_i (+ c_b base) in float32 over the piece's elements, chunk by chunk into
        reused buffers, the next chunk read while this one is combined."""
        spec, task = self.spec, self.tasks[piece.name]
        n_src = len(task.reads)
        passes = self._chunk_passes(piece, task.all_reads, pool)
        bytes_per_pass = self._pass_bytes(piece, task.all_reads)
        gram = None
        if spec.method.combination_needs_gram:  # the piece is the whole tensor (see plan_units)
            gram = np.zeros((n_src, n_src))
            for _, parts in passes():
                block = torch.stack([self._rounded(p).double() for p in parts[:n_src]])
                gram += (block @ block.T).numpy()
        coeffs, base_coeff = spec.method.combination(gram, task.options, task.per_model)
        if task.base is not None:
            coeffs = [*coeffs, base_coeff]
        for start, parts in passes():
            k = parts[0].numel()
            acc = self._buffer(("acc",), torch.float32)[:k]
            acc.copy_(self._rounded(parts[0])).mul_(coeffs[0])
            for c, x in zip(coeffs[1:], parts[1:]):
                if c != 0:
                    x = self._rounded(x)
                    if x.dtype != torch.float32:  # a same-dtype add is several times faster than a mixed one
                        x = self._buffer(("f32",), torch.float32)[:k].copy_(x)
                    acc.add_(x, alpha=c)
            self._write_chunk(piece, writer, start, acc, allow_nonfinite)
        return bytes_per_pass * (2 if gram is not None else 1)

    def _merge_chunked(self, piece: Piece, writer: BackgroundWriter, allow_nonfinite: bool,
                       pool: ThreadPoolExecutor) -> int:
        """TIES and kin on a whole tensor, chunk by chunk: two passes find each sparsified model's
        magnitude mask (magnitude_select), a third merges with the masks."""
        spec, task = self.spec, self.tasks[piece.name]
        assert task.base is not None  # TIES & co need a base (MergeMethod.needs_base)
        options, per_model = task.options, task.per_model
        passes = self._chunk_passes(piece, task.all_reads, pool)
        selects = [MagnitudeSelect(piece.count, float(d), bool(options["rescale"]))
                   if float(d) < 1 and spec.method.chunked_masks else None for d in per_model["density"]]
        n_passes = 1
        work = self.work
        if any(s is not None for s in selects):
            for step in ("first_pass", "second_pass"):
                for _, parts in passes():
                    base = parts[-1].to(self.compute).to(work)
                    for sel, x in zip(selects, parts):
                        if sel is not None:
                            getattr(sel, step)((x.to(self.compute).to(work) - base).to(torch.float32))
            n_passes = 3
        masks = [s.mask() if s is not None else None for s in selects]
        for start, parts in passes():
            inp = MergeInputs([x.to(self.compute).to(work) for x in parts[:-1]], parts[-1].to(self.compute).to(work),
                              per_model, options)
            self._write_chunk(piece, writer, start, spec.method.chunked(inp, masks), allow_nonfinite)
        return n_passes * self._pass_bytes(piece, task.all_reads)

    def _read_inputs(self, name: str) -> tuple[dict[tuple[str, str], torch.Tensor], int]:
        reads = set(self.tasks[name].all_reads)
        tensors = {(model, t): self.ckpts[model].read(t) for model, t in reads}
        return tensors, sum(self.ckpts[model].entries[t].nbytes for model, t in reads)

    def _maybe_crash(self) -> None:
        marker = os.environ.get(CRASH_ONCE_ENV)
        if marker and self._units_done >= 1 and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)


def check_merge(spec: MergeSpec) -> tuple[dict[str, Checkpoint], list[TensorTask], BuiltVocabulary | None]:
    """Open the inputs (headers only), build the output tokenizer the config asks for (tokenizer
    files only), and plan every output tensor with its parameters: each problem of the inputs or
    the config fails here, before Ray starts or any tensor is read."""
    ckpts = open_inputs(spec)
    vocab = None
    if spec.tokenizer is not None:
        lead = spec.base.ref if spec.base is not None else spec.inputs[0].ref
        vocab = build_vocabulary(spec.tokenizer, {m.ref: m.path for m in spec.inputs},
                                 {ref: ck.config for ref, ck in ckpts.items()}, lead, spec.source)
    return ckpts, plan_tensors(spec, ckpts, vocab), vocab


def run_merge(spec: MergeSpec, out: str | Path, opts: ExecOptions = ExecOptions()) -> MergeResult:
    """Merge `spec` into the folder `out` (written beside it, renamed when complete)."""
    t0 = time.perf_counter()
    ckpts, task_list, vocab = check_merge(spec)
    compute_torch = compute_dtype(spec, opts.compute_dtype)
    compute = TORCH_TO_DTYPE[compute_torch]
    tasks = {t.name: t for t in task_list}
    plans = plan_shards(task_list, ckpts, spec.out_dtype or spec.dtype, opts.shard_bytes)
    layouts = {p.file: file_layout(list(p.tensors), {"format": "pt"}) for p in plans}
    total = sum(int(np.prod(shape, dtype=np.int64)) for p in plans for _, shape, _ in p.tensors)
    unit_elems = opts.unit_elems or max(total // (4 * max(1, opts.workers)), 1 << 24)
    units = plan_units(plans, layouts, spec.method.elementwise, unit_elems)
    out = Path(out)
    with atomic_output_dir(out, overwrite=opts.overwrite, inputs=input_paths(spec)) as tmp:
        partial = {p.file: tmp / (p.file + ".partial") for p in plans}
        for p in plans:
            preallocate(partial[p.file], layouts[p.file])
        # Largest units first: a pool finishes close together.
        order = sorted(range(len(units)), key=lambda i: -units[i].elems)
        if opts.in_process:
            stats = _run_in_process(spec, tasks, opts, [units[i] for i in order], partial, compute)
        else:
            stats = _run_on_ray(spec, tasks, opts, [units[i] for i in order], partial, compute)
        with ThreadPoolExecutor(max_workers=4) as pool:  # make every shard durable, then publish it
            list(pool.map(_sync, partial.values()))
        for p in plans:
            os.replace(partial[p.file], tmp / p.file)
        write_side_files(spec, ckpts, output_layers(spec, ckpts), plans, tmp, vocab,
                         str(compute_torch).removeprefix("torch."))
        written = sum((tmp / p.file).stat().st_size for p in plans)
    return MergeResult(
        out=out,
        tensors=sum(len(p.tensors) for p in plans),
        shards=len(plans),
        bytes_read=sum(s["bytes_read"] for s in stats),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        units=len(units),
        per_unit=stats,
    )


def _run_on_ray(spec: MergeSpec, tasks: dict[str, TensorTask], opts: ExecOptions, units: list[WorkUnit],
                partial: dict[str, Path], compute: str) -> list[dict]:
    """Units round robin over a pool of restartable actors; a lost worker's unit is retried."""
    placement.check_placeable("merge worker", ResourceAsk(opts.cpus_per_worker, 0.0, opts.memory_per_worker),
                              opts.resources)
    worker_cls = ray.remote(UnitMerger).options(
        num_cpus=opts.cpus_per_worker,
        memory=opts.memory_per_worker,
        max_restarts=opts.max_retries,
        max_task_retries=opts.max_retries,
        resources=opts.resources,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k == CRASH_ONCE_ENV}} or None,
    )
    n_workers = max(1, min(opts.workers, len(units)))
    tasks_ref = ray.put(tasks)
    workers = [worker_cls.remote(spec, tasks_ref, opts.cpus_per_worker, opts.stream_bytes, opts.chunk_elems, compute)
               for _ in range(n_workers)]
    try:
        futures = [workers[k % n_workers].run.remote(u, str(partial[u.file]), opts.allow_nonfinite)
                   for k, u in enumerate(units)]
        return ray_get(futures)
    finally:
        for w in workers:
            ray.kill(w)


def _run_in_process(spec: MergeSpec, tasks: dict[str, TensorTask], opts: ExecOptions, units: list[WorkUnit],
                    partial: dict[str, Path], compute: str) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        merger = UnitMerger(spec, tasks, opts.cpus_per_worker, opts.stream_bytes, opts.chunk_elems, compute)
        return [merger.run(u, str(partial[u.file]), opts.allow_nonfinite) for u in units]
    finally:
        torch.set_num_threads(threads)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


