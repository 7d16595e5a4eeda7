"""The streaming merge engine: plan the output, run its work units where the user is, publish.

The driver fixes the output's shards and the byte offset of every output tensor before anything
is merged (units.py) and creates each shard file with its header. Work units (a run of tensors
of one shard, or an element range of one large tensor for an elementwise method) then run in
threads of this process (the default: nothing to start) or on a pool of Ray actors when a
cluster is named (placements.py). Each worker reads only its tensors, merges and writes at its
offsets (unit_merger.py). The driver syncs and renames the shards and writes the small files
(index, config, tokenizer, model card). The output bytes do not depend on the placement, the
number of workers or retries.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.safetensors_format import TORCH_NAMES, file_layout, preallocate
from simmerge_ray.io.shared_vocab import remapped_ids
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.output_files import write_side_files
from simmerge_ray.merge.placements import local_cpus, run_local, run_on_ray
from simmerge_ray.merge.progress import Progress
from simmerge_ray.merge.tensor_merge import compute_code, tensor_compute
from simmerge_ray.merge.tensor_plan import TensorTask, check_parts, output_layers, plan_tensors
from simmerge_ray.merge.tokenizer import BuiltVocabulary, build_vocabulary
from simmerge_ray.merge.piece_routes import open_inputs
from simmerge_ray.merge.unit_merger import UnitMerger
from simmerge_ray.merge.units import ShardPlan, WorkUnit, plan_shards, plan_units
from simmerge_ray.resources import SizeFrom

log = logging.getLogger(__name__)

PLACEMENTS = ("local", "ray")


@dataclass(frozen=True)
class ExecOptions:
    # "local": threads of this process, nothing started (a crash ends the command); "ray": actors
    # on the Ray cluster this process is connected to, restarted and retried when lost.
    placement: str = "local"
    workers: int | None = None  # None: local, this process's CPUs; Ray, 2
    # What set `workers` (a flag, refused when Ray can never hold them, or SIMMERGE_MAX_ACTORS, a cap);
    # None: a default. A cap or a default is cut to what the cluster holds.
    workers_from: SizeFrom | None = None
    cpus_per_worker: float = 1.0  # Ray: the actor's CPU ask; both: torch threads per worker
    memory_per_worker: int | None = None  # bytes, a Ray scheduling hint
    shard_bytes: int = 512 * 1024**2
    # Linear combinations and TIES are merged in chunks of chunk_elems elements, and so is SLERP
    # for a tensor whose float32 working set (inputs + output) exceeds stream_bytes; a tensor
    # whose passes need it twice is kept in memory up to stream_bytes of inputs. 1M elements keeps
    # a chunk's buffers in the L2/L3 caches: 1.5x faster than 8M on this machine's EPYC.
    stream_bytes: int = 256 * 1024**2
    chunk_elems: int = 1024**2
    # Elements per work unit; None: about a quarter of each worker's share, at least 16M.
    unit_elems: int | None = None
    allow_nonfinite: bool = False
    allow_crimes: bool = False  # merge models of different architectures (model_type), as mergekit's flag
    overwrite: bool = False
    max_retries: int = 3  # Ray: restarts of a lost worker (its process or its node), and retries of its unit
    # Custom Ray resources each worker asks for, to place the merge on nodes that advertise them
    # (`ray start --resources '{"nvme": 4}'`); None: anywhere with CPUs.
    resources: dict[str, float] | None = None
    # The dtype the methods compute in; None: the config's `dtype`, as mergekit, and without one
    # each tensor's inputs' dtype (promoted when they differ: bf16 with fp16 gives float32), as
    # mergekit. "float32" computes every method in float32 whatever the config says
    # (`--compute-dtype float32`); the output's dtype does not change with it.
    compute_dtype: str | None = None
    progress: bool = False  # a progress bar on stderr (only drawn when it is a terminal)
    # The class every worker thread or actor merges with: a subclass can add instrumentation
    # (the fault-injection tests crash one) without the library carrying it.
    worker_cls: type[UnitMerger] = UnitMerger

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    @property
    def n_workers(self) -> int:
        if self.workers is not None:
            return max(1, self.workers)
        return local_cpus() if self.placement == "local" else 2


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
    workers: int = 0  # that merged it: at most one per work unit, on Ray at most what the cluster holds


@dataclass(frozen=True)
class MergeLayout:
    """What a merge will write and how it is cut up, known before any tensor is read."""

    ckpts: dict[str, Checkpoint]
    tasks: dict[str, TensorTask]
    vocab: BuiltVocabulary | None
    shards: list[ShardPlan]
    layouts: dict
    units: list[WorkUnit]
    compute: str  # the dtype the tensors compute in, by name ("bfloat16"; several when they differ)

    @property
    def numels(self) -> dict[str, int]:
        return _numels(self.shards)


def _numels(shards: list[ShardPlan]) -> dict[str, int]:
    """Elements of every output tensor, by name."""
    return {name: int(np.prod(shape, dtype=np.int64)) for p in shards for name, shape, _ in p.tensors}


def compute_summary(tasks: list[TensorTask]) -> str:
    """The compute dtype by name ("bfloat16"), or each one with its tensor count when tensors
    differ (inputs of several dtypes without `dtype`: "bfloat16 (20 tensors), float32 (2 tensors)")."""
    counts = Counter(TORCH_NAMES[t.compute] for t in tasks)
    if len(counts) <= 1:
        return next(iter(counts), "float32")
    return ", ".join(f"{name} ({n} tensor{'s' * (n != 1)})" for name, n in counts.most_common())


def input_paths(spec: MergeSpec) -> list[Path]:
    """The folders a merge reads: its output may not be, hold or lie inside any of them."""
    return [m.path for m in spec.inputs]


def check_merge(spec: MergeSpec, pending: Mapping[str, Checkpoint] | None = None, *, allow_crimes: bool = False
                ) -> tuple[dict[str, Checkpoint], list[TensorTask], BuiltVocabulary | None]:
    """Open the inputs (headers only), build the output tokenizer the config asks for (tokenizer
    files only), and plan every output tensor with its parameters: each problem of the inputs or
    the config fails here, before Ray starts or any tensor is read. `pending`: stand-ins for
    inputs not written yet, by reference (open_inputs)."""
    ckpts = open_inputs(spec, pending)
    check_parts(spec, ckpts)
    vocab = None
    shown = spec.provenance.steps if spec.provenance is not None else None  # earlier merges by name
    if spec.tokenizer is None and (remapped := remapped_ids([m.ref for m in spec.inputs],
                                                          [ckpts[m.ref] for m in spec.inputs], shown)):
        log.warning("%s", remapped)
    if spec.tokenizer is not None:
        lead = spec.base.ref if spec.base is not None else spec.inputs[0].ref
        models: dict[str, Any] = {m.ref: m.path for m in spec.inputs}
        models.update({ref: tok for ref, ck in ckpts.items()  # a stand-in's: the tokenizer its output gets
                       if (tok := ck.tokenizer_source()) is not None})
        vocab = build_vocabulary(spec.tokenizer, models, {ref: ck.config for ref, ck in ckpts.items()}, lead,
                                 spec.source)
    return ckpts, plan_tensors(spec, ckpts, vocab, allow_crimes=allow_crimes), vocab


def _check_selection_dtype(spec: MergeSpec, tasks: list[TensorTask]) -> None:
    """The magnitude selection (TIES and kin) histograms the bits of 16- or 32-bit floats: a
    float64 compute dtype is refused before any work, naming the first tensor."""
    if not spec.method.chunked_masks:
        return
    for t in tasks:
        if t.compute == "F64" and any(float(d) < 1 for d in t.per_model["density"]):
            raise ConfigError(f"{spec.source}: {t.name}: {spec.method.name} selects magnitudes in float32, bfloat16 "
                              "or float16, not float64 (the inputs' or `dtype`'s): set `dtype: float32`")


def plan_merge(spec: MergeSpec, opts: ExecOptions = ExecOptions(),
               pending: Mapping[str, Checkpoint] | None = None) -> MergeLayout:
    """Everything about a merge but the merging: checks, shards, offsets and work units
    (`pending`: see check_merge)."""
    ckpts, task_list, vocab = check_merge(spec, pending, allow_crimes=opts.allow_crimes)
    merge_compute = compute_code(spec, opts.compute_dtype)
    task_list = [replace(t, compute=tensor_compute(merge_compute, (ckpts[m].entries[n].dtype for m, n in t.all_reads)))
                 for t in task_list]
    _check_selection_dtype(spec, task_list)
    shards = plan_shards(task_list, ckpts, spec.out_dtype or spec.dtype, opts.shard_bytes)
    layouts = {p.file: file_layout(list(p.tensors), {"format": "pt"}) for p in shards}
    total = sum(_numels(shards).values())
    unit_elems = opts.unit_elems or max(total // (4 * opts.n_workers), 1 << 24)
    tasks = {t.name: t for t in task_list}
    # Rows remapped to the output vocabulary are merged whole (PieceRoutes.fused): never cut.
    units = plan_units(shards, layouts, lambda name: spec.method.elementwise and tasks[name].vocab is None, unit_elems)
    units.sort(key=lambda u: -u.elems)  # largest first: a pool finishes close together
    return MergeLayout(ckpts, tasks, vocab, shards, layouts, units,
                       compute_summary(task_list))


def run_merge(spec: MergeSpec, out: str | Path, opts: ExecOptions = ExecOptions()) -> MergeResult:
    """Merge `spec` into the folder `out` (written beside it, renamed when complete)."""
    t0 = time.perf_counter()
    plan = plan_merge(spec, opts)
    out = Path(out)
    numels = plan.numels
    bytes_in = sum(plan.ckpts[ref].entries[name].nbytes for t in plan.tasks.values() for ref, name in set(t.all_reads))
    progress = Progress.for_terminal(sum(numels.values()), len(numels), bytes_in, quiet=not opts.progress)
    with atomic_output_dir(out, overwrite=opts.overwrite, inputs=input_paths(spec)) as tmp:
        partial = {p.file: tmp / (p.file + ".partial") for p in plan.shards}
        for p in plan.shards:
            preallocate(partial[p.file], plan.layouts[p.file])
        common = dict(stream_bytes=opts.stream_bytes, chunk_elems=opts.chunk_elems,
                      allow_nonfinite=opts.allow_nonfinite, progress=progress, worker_cls=opts.worker_cls)
        try:
            if opts.placement == "local":
                stats = run_local(spec, plan.tasks, plan.units, partial, workers=opts.n_workers,
                                  threads_per_worker=int(max(1, opts.cpus_per_worker)), **common)
                used = min(opts.n_workers, len(plan.units))
            else:
                stats, used = run_on_ray(spec, plan.tasks, plan.units, partial, workers=opts.n_workers,
                                         workers_from=opts.workers_from, cpus_per_worker=opts.cpus_per_worker,
                                         memory_per_worker=opts.memory_per_worker, resources=opts.resources,
                                         max_retries=opts.max_retries, **common)
        finally:
            progress.close()
        with ThreadPoolExecutor(max_workers=4) as pool:  # make every shard durable, then publish it
            list(pool.map(_sync, partial.values()))
        for p in plan.shards:
            os.replace(partial[p.file], tmp / p.file)
        write_side_files(spec, plan.ckpts, output_layers(spec, plan.ckpts), plan.shards, tmp, plan.vocab,
                         plan.compute)
        written = sum((tmp / p.file).stat().st_size for p in plan.shards)
    return MergeResult(
        out=out,
        tensors=len(numels),
        shards=len(plan.shards),
        bytes_read=sum(s["bytes_read"] for s in stats),
        bytes_written=written,
        seconds=time.perf_counter() - t0,
        units=len(plan.units),
        per_unit=stats,
        workers=used,
    )


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
