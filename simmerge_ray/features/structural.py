"""The structural-feature pass: every checkpoint byte read once, on a pool of Ray actors.

For every tensor name, one actor reads that tensor from all the models (and the base) chunk
by chunk and folds the chunks into a small Gram matrix plus sign-agreement counts
(`gram_math.GramAccumulator`); only those small matrices travel back. The driver sums them
into features per pair, module group, depth third and layer, and writes the per-tensor raw
Gram matrices for the multi-way planner.

Cache: Gram entries are stored per (reference, model pair) keyed by checkpoint fingerprints,
so a catalog that is reordered or shrunk reads nothing, and a catalog that gains a model
computes only the new model's column. Exact inner products with the new model still need the
old models' values, so those are read once more (each once, never once per pair): see
docs/structural.md for why no exact scheme can avoid that.

This module holds the pass's plan, cache and Ray plumbing; the rows and their checks are in
structural_rows.py, the streaming reads and the worker in structural_reads.py, the outputs in
structural_outputs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from simmerge_ray import resources
from simmerge_ray.actor_pool import ActorPool
from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.features import gram_kernel
from simmerge_ray.features.gram_cache import GramCache, load_entry, save_entry
from simmerge_ray.features.gram_math import PRECISIONS
from simmerge_ray.features.joined import JOINED_FILE, write_joined
from simmerge_ray.features.structural_outputs import assemble, pair_arrays, run_json, write_outputs
from simmerge_ray.features.structural_reads import GramWorker
from simmerge_ray.features.structural_rows import Rows, open_rows
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.safetensors_format import DTYPE_BYTES
from simmerge_ray.io.stage_files import check_stage, stage_files

REF_KEY = "ref"  # cache key of the reference row (its fingerprint names the cache folder)
BATCHES_PER_WORKER = 8  # calls per actor in a pass: progress steps, each with little overhead
# What the pass writes to its --out folder (which it shares with the functional stage).
STRUCTURAL_FILES = ("structural.parquet", "structural_layers.parquet", "gram.safetensors", "gram_meta.json",
                    "structural_run.json")


@dataclass(frozen=True)
class StructuralOptions:
    """How the pass runs; only `precision` changes the features, and only in rounding."""

    workers: int | None = None  # actors (default: SIMMERGE_MAX_ACTORS, else one per free CPU the asks fit)
    chunk_elems: int = 1 << 20  # values mapped per model per step (the kernel blocks it further)
    precision: str = "float32"  # products in float32 (~1e-7 relative) or float64 (exact for bf16)
    use_cache: bool = True
    overwrite: bool = False
    # Custom Ray resources each actor asks for, to place the pass on nodes that advertise them.
    resources: dict[str, float] | None = None
    max_retries: int = 3  # restarts of an actor lost with its node, and retries of its calls (pure reads)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.chunk_elems < 1:
            raise ConfigError(f"chunk_elems: expected a positive count, got {self.chunk_elems}")


@dataclass
class StructuralRun:
    """What a pass did: the counters the cache tests and the benchmark read."""

    out: Path
    models: list[str]
    base: str | None
    tensors: int
    tensors_computed: int
    bytes_read: dict[str, int]  # per model (and base) name
    tensor_reads: dict[str, int]  # tensors opened per model (and base) name
    entries_computed: int  # Gram entries computed, summed over tensors
    pairs_cached: int  # unordered row pairs found in the cache
    seconds: float
    per_tensor_seconds: list[float] = field(default_factory=list)
    stream_seconds: float = 0.0  # from the actor pool being ready to the last tensor's result

    @property
    def total_bytes_read(self) -> int:
        return sum(self.bytes_read.values())


# ---- the cache of Gram entries ----------------------------------------------------------------

@dataclass
class ReadPlan:
    """What a pass must compute: the rows it reads and the Gram columns it computes."""

    read_rows: list[int]
    cols: list[int]  # subset of read_rows

    @property
    def empty(self) -> bool:
        return not self.cols


def plan_pass(ref: int, missing: set[tuple[int, int]]) -> ReadPlan:
    """Columns covering every missing pair: rows never computed before (missing diagonal) first,
    then one side of each remaining pair. Every missing pair then has a side among the columns,
    and only the rows that appear in a missing pair (plus the reference) are read."""
    cols = sorted({i for i, j in missing if i == j})
    for i, j in sorted(missing):
        if i not in cols and j not in cols:
            cols.append(j)
    if not cols:
        return ReadPlan([], [])
    read = sorted({i for pair in missing for i in pair} | {ref})
    return ReadPlan(read, sorted(cols))


# ---- the pass ---------------------------------------------------------------------------------

def compute_structural(catalog: Catalog, out: str | Path, opts: StructuralOptions = StructuralOptions(),
                       progress: Callable[[int, int], None] | None = None, rows: Rows | None = None) -> StructuralRun:
    """Compute the structural features of every model pair of `catalog` into the folder `out`.

    `progress(done, total)` is called with bytes of checkpoint data processed so far; `rows` are
    the catalog's checkpoints already opened and checked (open_rows), e.g. before Ray started.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_structural_out(catalog, out, opts.overwrite)
    rows = rows if rows is not None else open_rows(catalog)
    m = len(rows.names)
    keys = [REF_KEY if i == rows.ref else rows.ckpts[i].fingerprint() for i in range(m)]
    cache = GramCache(rows.ckpts[rows.ref].fingerprint(), rows.has_base, opts.precision)
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    cache_names = [rows.key(t) for t in rows.tensors]
    found: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    if opts.use_cache:
        for i, j in pairs:
            got = cache.load(keys[i], keys[j], cache_names)
            if got is not None:
                found[(i, j)] = got
    plan = plan_pass(rows.ref, {p for p in pairs if p not in found})
    run = StructuralRun(out, rows.names[:rows.n_models], rows.names[m - 1] if rows.has_base else None,
                        len(rows.tensors), 0, {n: 0 for n in rows.names}, {n: 0 for n in rows.names}, 0,
                        len(found), 0.0)
    if not plan.empty:
        blocks = _run_pass(rows, plan, keys, cache, opts, run, progress)
        for i, j in pairs:
            if (i, j) not in found:
                found[(i, j)] = pair_arrays(blocks, plan, rows.tensors, i, j)
                if opts.use_cache:
                    cache.save(keys[i], keys[j], cache_names, found[(i, j)])
        if opts.use_cache:
            shutil.rmtree(cache.work_dir(_plan_digest(plan, keys, rows)), ignore_errors=True)
    stats = assemble(found, m, len(rows.tensors))
    with stage_files(out, "structural", STRUCTURAL_FILES, replace=opts.overwrite, inputs=catalog.paths) as tmp:
        write_outputs(tmp, rows, stats)
        run.seconds = time.perf_counter() - t0
        atomic_write_text(tmp / "structural_run.json", json.dumps(run_json(run), indent=2))
    write_joined(out)
    return run


def check_structural_out(catalog: Catalog, out: Path, overwrite: bool) -> None:
    """The output checks of the pass, before any work (the CLI calls it before Ray starts)."""
    check_stage(out, STRUCTURAL_FILES, replace=overwrite, inputs=catalog.paths)
    check_stage(out, (JOINED_FILE,), replace=True)


def _plan_digest(plan: ReadPlan, keys: Sequence[str], rows: Rows) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([[keys[i] for i in plan.read_rows], [keys[i] for i in plan.cols],
                         [rows.key(t) for t in rows.tensors]]).encode())
    return h.hexdigest()


def _run_pass(rows: Rows, plan: ReadPlan, keys: Sequence[str], cache: GramCache, opts: StructuralOptions,
              run: StructuralRun, progress: Callable[[int, int], None] | None) -> dict[str, dict]:
    """Stream the plan's rows through a pool of actors; returns per-tensor result blocks."""
    work = cache.work_dir(_plan_digest(plan, keys, rows))
    if opts.use_cache:
        work.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, dict] = {}
    for t in rows.tensors:
        saved = load_entry(GramCache.work_file(work, rows.key(t))) if opts.use_cache else None
        if saved is not None:
            blocks[t] = saved
    todo = [t for t in rows.tensors if t not in blocks]
    size = {t: sum(rows.numel(t) * DTYPE_BYTES[rows.entry(r, t).dtype] for r in plan.read_rows) for t in todo}
    grand, done = sum(size.values()), 0
    if progress:
        progress(0, grand)
    if not todo:
        return blocks
    ask = resources.streaming_ask()
    # By default one per free CPU (the pool cuts it to what a memory ask lets the cluster hold).
    free = ray.available_resources().get("CPU", 1.0) if ray.is_initialized() else os.cpu_count() or 1
    n_workers, size_from = resources.pool_size(opts.workers, max(1, int(free // max(ask.num_cpus, 1e-9))))
    n_workers = max(1, min(n_workers, len(todo)))
    ref_pos = plan.read_rows.index(rows.ref)
    col_pos = [plan.read_rows.index(c) for c in plan.cols]
    paths = [str(rows.ckpts[r].path) for r in plan.read_rows]
    gram_kernel.load()  # built once here, not by every actor of this node at once
    with ActorPool(GramWorker, n_workers, ask, what="structural actor", resources=opts.resources,
                   size_from=size_from,
                   max_retries=opts.max_retries,
                   args=(paths, ref_pos, col_pos, rows.has_base, opts.chunk_elems, opts.precision,
                         ask.num_cpus, {t: rows.numel(t) for t in rows.vocab_rows})) as pool:
        pool.wait_ready()
        t_ready = time.perf_counter()
        for _, results in pool.map_unordered("gram", tensor_batches(todo, size, n_workers)):
            for res in results:
                t = res["tensor"]
                _check_finite(rows, plan, t, res["gram"], col_pos, opts.precision)
                block = {"gram": res["gram"], "agree": res["agree"], "disagree": res["disagree"]}
                if opts.use_cache:
                    save_entry(GramCache.work_file(work, rows.key(t)), block)
                blocks[t] = block
                for r, nbytes in zip(plan.read_rows, res["bytes_read"]):
                    run.bytes_read[rows.names[r]] += nbytes
                    run.tensor_reads[rows.names[r]] += 1
                run.tensors_computed += 1
                run.entries_computed += res["gram"].size
                run.per_tensor_seconds.append(res["seconds"])
                done += size[t]
            if progress:
                progress(done, grand)
        run.stream_seconds = time.perf_counter() - t_ready
    return blocks


def tensor_batches(tensors: Sequence[str], size: dict[str, int], n_workers: int,
                   per_worker: int = BATCHES_PER_WORKER) -> list[list[str]]:
    """The tensors, largest first, cut into about `per_worker` x `n_workers` batches of similar
    bytes (a progress step each, and little per-call overhead). Handed out in this order to
    whichever actor frees up first, the largest work starts first and the pool finishes close
    together (list scheduling in decreasing size: within one batch of the ideal)."""
    ordered = sorted(tensors, key=lambda t: -size[t])
    target = max(1, sum(size[t] for t in tensors) // (max(1, n_workers) * per_worker))
    batches, batch, acc = [], [], 0
    for t in ordered:
        batch.append(t)
        acc += size[t]
        if acc >= target:
            batches.append(batch)
            batch, acc = [], 0
    return batches + ([batch] if batch else [])


def _check_finite(rows: Rows, plan: ReadPlan, tensor: str, gram: np.ndarray, col_pos: Sequence[int],
                  precision: str) -> None:
    """NaN or Inf anywhere in a row makes its own Gram entry non-finite: report it by name, and
    tell finite weights whose products overflow `precision` from weights that hold NaN or Inf."""
    diag = {plan.cols[k]: gram[p, k] for k, p in enumerate(col_pos)}
    bad = [r for r, v in diag.items() if not np.isfinite(v)]
    if not bad:
        return
    if rows.ref in bad:  # every centred row inherits the reference's NaN: blame the reference only
        bad = [rows.ref]
    who = ", ".join(f"{'base' if r == rows.n_models else 'model'} {rows.names[r]!r} ({rows.ckpts[r].path})"
                    for r in bad)
    largest = [_largest_if_finite(rows.ckpts[r], tensor) for r in bad]
    if None in largest:
        raise CheckpointError(f"tensor {tensor!r} holds NaN or Inf values in {who}; "
                              f"structural features of it would be undefined")
    hint = "; rerun with --precision float64" if precision == "float32" else ""
    raise CheckpointError(f"tensor {tensor!r} in {who} is finite but its products overflow {precision} "
                          f"(largest |value| {max(largest):.3g}){hint}")


def _largest_if_finite(ck: Checkpoint, tensor: str, chunk: int = 1 << 22) -> float | None:
    """The largest |value| of a stored tensor, or None if it holds NaN or Inf (read in chunks:
    on this error path too, a tensor is never whole in memory)."""
    import torch

    name, largest = ck.stored_name(tensor), 0.0
    numel = ck.stored_entry(tensor).numel
    for start in range(0, numel, chunk):
        part = ck.read_range(name, start, min(chunk, numel - start)).double()
        if not torch.isfinite(part).all():
            return None
        largest = max(largest, float(part.abs().max()))
    return largest


