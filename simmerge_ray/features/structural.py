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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import ray
import torch

from simmerge_ray import placement, resources
from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError, ray_get
from simmerge_ray.features import gram_kernel
from simmerge_ray.features.gram_cache import GramCache, load_entry, save_entry
from simmerge_ray.features.gram_math import (FEATURES, PRECISIONS, GramAccumulator, PairStats, pair_features,
                                             raw_gram, total)
from simmerge_ray.features.module_groups import GROUPS, THIRDS, depth_third, module_group
from simmerge_ray.features.joined import JOINED_FILE, write_joined
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.checkpoint import Checkpoint, layer_index
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, FLOAT_DTYPES, StreamingWriter
from simmerge_ray.io.stage_files import check_stage, stage_files

REF_KEY = "ref"  # cache key of the reference row (its fingerprint names the cache folder)
BATCHES_PER_WORKER = 8
# What the pass writes to its --out folder (which it shares with the functional stage).
STRUCTURAL_FILES = ("structural.parquet", "structural_layers.parquet", "gram.safetensors", "gram_meta.json",
                    "structural_run.json")  # calls per actor in a pass: progress steps, each with little overhead


@dataclass(frozen=True)
class StructuralOptions:
    """How the pass runs; only `precision` changes the features, and only in rounding."""

    workers: int | None = None  # actors in the pool (default: SIMMERGE_MAX_ACTORS, else one per free CPU)
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


# ---- the catalog's checkpoints, validated -----------------------------------------------------

@dataclass
class Rows:
    """The stacked rows of the pass: the models in catalog order, then the base."""

    names: list[str]
    ckpts: list[Checkpoint]
    n_models: int
    has_base: bool
    tensors: list[str]  # float tensors with at least one value, sorted

    @property
    def ref(self) -> int:
        """Row the Gram is centred on: the base, else the first model."""
        return self.n_models if self.has_base else 0

    def entry(self, row: int, tensor: str):
        return self.ckpts[row].entries[tensor]


def open_rows(catalog: Catalog) -> Rows:
    """Open every checkpoint of the catalog and check they can be compared tensor by tensor."""
    where = catalog.source or "catalog"
    if len(catalog.models) < 2:
        raise ConfigError(f"{where}: structural features compare models pairwise and need at least 2 "
                          f"models; the catalog has {len(catalog.models)}")
    ckpts = [Checkpoint.open(m.path) for m in catalog.models]
    names = list(catalog.names)
    _check_same_tensors(names, ckpts)
    if catalog.base is not None:
        base = Checkpoint.open(catalog.base)
        _check_base(names[0], ckpts[0], base)
        base_name = base.path.name if base.path.name not in names else f"{base.path.name}(base)"
        names.append(base_name)
        ckpts.append(base)
    first = ckpts[0]
    tensors = sorted(n for n, e in first.entries.items() if e.dtype in FLOAT_DTYPES and e.numel > 0)
    if not tensors:
        raise CheckpointError(f"{first.path}: no floating-point tensors to compare")
    return Rows(names, ckpts, len(catalog.models), catalog.base is not None, tensors)


def _signature(ck: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {n: tuple(e.shape) for n, e in ck.entries.items()}


def _differences(ref: dict[str, tuple[int, ...]], other: dict[str, tuple[int, ...]]) -> list[str]:
    missing = sorted(ref.keys() - other.keys())
    extra = sorted(other.keys() - ref.keys())
    shapes = sorted(n for n in ref.keys() & other.keys() if ref[n] != other[n])

    def listed(items: list[str], fmt: Callable[[str], str]) -> str:
        more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
        return ", ".join(fmt(n) for n in items[:3]) + more

    out = []
    if missing:
        out.append(f"lacks {listed(missing, repr)}")
    if extra:
        out.append(f"has extra {listed(extra, repr)}")
    if shapes:
        out.append("shape " + listed(shapes, lambda n: f"of {n!r} is {list(other[n])} not {list(ref[n])}"))
    return out


def _check_same_tensors(names: Sequence[str], ckpts: Sequence[Checkpoint]) -> None:
    ref = _signature(ckpts[0])
    problems = []
    for name, ck in zip(names[1:], ckpts[1:]):
        diff = _differences(ref, _signature(ck))
        if diff:
            problems.append(f"model {name!r} ({ck.path}): " + "; ".join(diff))
    if problems:
        raise CheckpointError(
            f"models do not share tensor names and shapes (compared with model {names[0]!r} at "
            f"{ckpts[0].path}): " + " | ".join(problems))


def _check_base(first_name: str, first: Checkpoint, base: Checkpoint) -> None:
    kinds = (first.config.get("model_type"), base.config.get("model_type"))
    if None not in kinds and kinds[0] != kinds[1]:
        raise CheckpointError(f"base {base.path} is a {kinds[1]!r} checkpoint but the models are "
                              f"{kinds[0]!r} (model {first_name!r} at {first.path})")
    diff = _differences(_signature(first), _signature(base))
    if diff:
        raise CheckpointError(f"base {base.path} does not match the models' architecture (compared with "
                              f"model {first_name!r} at {first.path}): " + "; ".join(diff))


# ---- streaming reads --------------------------------------------------------------------------

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

    def raw_chunks(self, tensor: str) -> Iterator[list[torch.Tensor]]:
        """Yield, per step, each checkpoint's next `chunk_elems` values in their stored dtype
        (valid until the next step)."""
        entries = [ck.entries[tensor] for ck in self.ckpts]
        numel = entries[0].numel
        for start in range(0, numel, self.chunk_elems):
            k = min(self.chunk_elems, numel - start)
            parts = [ck.map_range(tensor, start, k) for ck in self.ckpts]
            for i, e in enumerate(entries):
                self.bytes_read[i] += k * DTYPE_BYTES[e.dtype]
            yield parts
            del parts
            for ck in self.ckpts:
                ck.release_range(tensor, start, k)


class GramWorker:
    """One actor of the pool: streams its tensors and returns small matrices."""

    def __init__(self, paths: Sequence[str], ref: int, cols: Sequence[int], signed: bool,
                 chunk_elems: int, precision: str, cpus: float) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.ckpts = [Checkpoint.open(p) for p in paths]
        self.ref, self.cols, self.signed, self.chunk_elems = ref, list(cols), signed, chunk_elems
        self.precision = precision
        gram_kernel.load()  # built or loaded at start-up, not inside the first tensor

    def gram(self, tensors: Sequence[str]) -> list[dict]:
        """The Gram blocks of a batch of tensors (one call per batch: per-call overhead, paid in
        the driver on the same cores, stays small next to the streaming)."""
        return [self._one(t) for t in tensors]

    def _one(self, tensor: str) -> dict:
        t0 = time.perf_counter()
        reader = ChunkReader(self.ckpts, min(self.chunk_elems, self.ckpts[0].entries[tensor].numel))
        acc = GramAccumulator(len(self.ckpts), self.ref, self.cols, self.signed, precision=self.precision)
        for parts in reader.raw_chunks(tensor):
            acc.add_parts(parts)
        gram, agree, disagree = acc.result()
        return {"tensor": tensor, "gram": gram, "agree": agree, "disagree": disagree,
                "bytes_read": reader.bytes_read, "seconds": time.perf_counter() - t0}


# ---- the cache of Gram entries ----------------------------------------------------------------

@dataclass
class Plan:
    """What a pass must compute: the rows it reads and the Gram columns it computes."""

    read_rows: list[int]
    cols: list[int]  # subset of read_rows

    @property
    def empty(self) -> bool:
        return not self.cols


def plan_pass(rows: int, ref: int, missing: set[tuple[int, int]]) -> Plan:
    """Columns covering every missing pair: rows never computed before (missing diagonal) first,
    then one side of each remaining pair. Every missing pair then has a side among the columns,
    and only the rows that appear in a missing pair (plus the reference) are read."""
    cols = sorted({i for i, j in missing if i == j})
    for i, j in sorted(missing):
        if i not in cols and j not in cols:
            cols.append(j)
    if not cols:
        return Plan([], [])
    read = sorted({i for pair in missing for i in pair} | {ref})
    return Plan(read, sorted(cols))


# ---- the pass ---------------------------------------------------------------------------------

def compute_structural(catalog: Catalog, out: str | Path, opts: StructuralOptions = StructuralOptions(),
                       progress: Callable[[int, int], None] | None = None) -> StructuralRun:
    """Compute the structural features of every model pair of `catalog` into the folder `out`.

    `progress(done, total)` is called with bytes of checkpoint data processed so far.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_structural_out(catalog, out, opts.overwrite)
    rows = open_rows(catalog)
    m = len(rows.names)
    keys = [REF_KEY if i == rows.ref else rows.ckpts[i].fingerprint() for i in range(m)]
    cache = GramCache(rows.ckpts[rows.ref].fingerprint(), rows.has_base, opts.precision)
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    found: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    if opts.use_cache:
        for i, j in pairs:
            got = cache.load(keys[i], keys[j], rows.tensors)
            if got is not None:
                found[(i, j)] = got
    plan = plan_pass(m, rows.ref, {p for p in pairs if p not in found})
    run = StructuralRun(out, rows.names[:rows.n_models], rows.names[m - 1] if rows.has_base else None,
                        len(rows.tensors), 0, {n: 0 for n in rows.names}, {n: 0 for n in rows.names}, 0,
                        len(found), 0.0)
    if not plan.empty:
        blocks = _run_pass(rows, plan, keys, cache, opts, run, progress)
        for i, j in pairs:
            if (i, j) not in found:
                found[(i, j)] = _pair_arrays(blocks, plan, rows.tensors, i, j)
                if opts.use_cache:
                    cache.save(keys[i], keys[j], rows.tensors, found[(i, j)])
        if opts.use_cache:
            shutil.rmtree(cache.work_dir(_plan_digest(plan, keys, rows)), ignore_errors=True)
    stats = _assemble(found, m, len(rows.tensors))
    with stage_files(out, "structural", STRUCTURAL_FILES, replace=opts.overwrite, inputs=catalog.paths) as tmp:
        _write_outputs(tmp, rows, stats, keys)
        run.seconds = time.perf_counter() - t0
        atomic_write_text(tmp / "structural_run.json", json.dumps(_run_json(run), indent=2))
    write_joined(out)
    return run


def check_structural_out(catalog: Catalog, out: Path, overwrite: bool) -> None:
    """The output checks of the pass, before any work (the CLI calls it before Ray starts)."""
    check_stage(out, STRUCTURAL_FILES, replace=overwrite, inputs=catalog.paths)
    check_stage(out, (JOINED_FILE,), replace=True)


def _plan_digest(plan: Plan, keys: Sequence[str], rows: Rows) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([[keys[i] for i in plan.read_rows], [keys[i] for i in plan.cols], rows.tensors]).encode())
    return h.hexdigest()


def _run_pass(rows: Rows, plan: Plan, keys: Sequence[str], cache: GramCache, opts: StructuralOptions,
              run: StructuralRun, progress: Callable[[int, int], None] | None) -> dict[str, dict]:
    """Stream the plan's rows through a pool of actors; returns per-tensor result blocks."""
    work = cache.work_dir(_plan_digest(plan, keys, rows))
    if opts.use_cache:
        work.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, dict] = {}
    for t in rows.tensors:
        saved = load_entry(GramCache.work_file(work, t)) if opts.use_cache else None
        if saved is not None:
            blocks[t] = saved
    todo = [t for t in rows.tensors if t not in blocks]
    size = {t: sum(rows.entry(r, t).nbytes for r in plan.read_rows) for t in todo}
    grand, done = sum(size.values()), 0
    if progress:
        progress(0, grand)
    if not todo:
        return blocks
    ask = resources.streaming_ask()
    if opts.workers:
        n_workers = opts.workers
    else:
        free = ray.available_resources().get("CPU", 1.0) if ray.is_initialized() else os.cpu_count() or 1
        n_workers = resources.max_actors(max(1, int(free // max(ask.num_cpus, 1e-9))))
    n_workers = max(1, min(n_workers, len(todo)))
    ref_pos = plan.read_rows.index(rows.ref)
    col_pos = [plan.read_rows.index(c) for c in plan.cols]
    paths = [str(rows.ckpts[r].path) for r in plan.read_rows]
    placement.check_placeable("structural actor", ask, opts.resources)
    gram_kernel.load()  # built once here, not by every actor of this node at once
    worker_cls = ray.remote(GramWorker).options(**ask.ray_options(), resources=opts.resources,
                                                max_restarts=opts.max_retries, max_task_retries=opts.max_retries)
    workers = [worker_cls.remote(paths, ref_pos, col_pos, rows.has_base, opts.chunk_elems, opts.precision,
                                 ask.num_cpus) for _ in range(n_workers)]
    ray.get([w.__ray_ready__.remote() for w in workers])
    t_ready = time.perf_counter()
    pending = {workers[w].gram.remote(batch): batch for w, batch in batch_calls(todo, size, n_workers)}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            for res in ray_get(ready[0]):
                t = res["tensor"]
                _check_finite(rows, plan, t, res["gram"], col_pos)
                block = {"gram": res["gram"], "agree": res["agree"], "disagree": res["disagree"]}
                if opts.use_cache:
                    save_entry(GramCache.work_file(work, t), block)
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
    finally:
        for w in workers:
            ray.kill(w)
    return blocks


def batch_calls(tensors: Sequence[str], size: dict[str, int], n_workers: int,
                per_worker: int = BATCHES_PER_WORKER) -> list[tuple[int, list[str]]]:
    """(worker, tensors) calls: the largest tensors first, each to the least loaded worker, so
    the pool finishes close together; then each worker's share cut into about `per_worker`
    batches of similar bytes (a progress step each, and little per-call overhead)."""
    load = [0] * n_workers
    shares: list[list[str]] = [[] for _ in range(n_workers)]
    for t in sorted(tensors, key=lambda t: -size[t]):
        w = load.index(min(load))
        load[w] += size[t]
        shares[w].append(t)
    calls = []
    for w, share in enumerate(shares):
        target, batch, acc = max(1, load[w] // per_worker), [], 0
        for t in share:
            batch.append(t)
            acc += size[t]
            if acc >= target:
                calls.append((w, batch))
                batch, acc = [], 0
        if batch:
            calls.append((w, batch))
    return calls


def _check_finite(rows: Rows, plan: Plan, tensor: str, gram: np.ndarray, col_pos: Sequence[int]) -> None:
    """NaN or Inf anywhere in a row makes its own Gram entry non-finite: report it by name."""
    diag = {plan.cols[k]: gram[p, k] for k, p in enumerate(col_pos)}
    bad = [r for r, v in diag.items() if not np.isfinite(v)]
    if not bad:
        return
    if rows.ref in bad:  # every centred row inherits the reference's NaN: blame the reference only
        bad = [rows.ref]
    who = ", ".join(f"{'base' if r == rows.n_models else 'model'} {rows.names[r]!r} ({rows.ckpts[r].path})"
                    for r in bad)
    raise CheckpointError(f"tensor {tensor!r} holds NaN or Inf values in {who}; "
                          f"structural features of it would be undefined")


def _pair_arrays(blocks: dict[str, dict], plan: Plan, tensors: Sequence[str], i: int, j: int) -> dict[str, np.ndarray]:
    """One pair's per-tensor values, taken from whichever side is a computed column."""
    if j in plan.cols and i in plan.read_rows:
        r, c = plan.read_rows.index(i), plan.cols.index(j)
    else:
        r, c = plan.read_rows.index(j), plan.cols.index(i)
    return {k: np.array([blocks[t][k][r, c] for t in tensors]) for k in ("gram", "agree", "disagree")}


def _assemble(found: dict[tuple[int, int], dict[str, np.ndarray]], m: int, n_tensors: int) -> list[PairStats]:
    centred = np.zeros((n_tensors, m, m))
    agree = np.zeros((n_tensors, m, m), np.int64)
    disagree = np.zeros((n_tensors, m, m), np.int64)
    for (i, j), arr in found.items():
        for dst, key in ((centred, "gram"), (agree, "agree"), (disagree, "disagree")):
            dst[:, i, j] = arr[key]
            dst[:, j, i] = arr[key]
    return [PairStats(centred[t], agree[t], disagree[t]) for t in range(n_tensors)]


# ---- outputs ----------------------------------------------------------------------------------

def _write_outputs(out: Path, rows: Rows, stats: list[PairStats], keys: Sequence[str]) -> None:
    m, n = len(rows.names), rows.n_models
    first = rows.ckpts[0]
    n_layers = first.num_layers
    meta: dict[str, dict] = {}
    for t in rows.tensors:
        layer = layer_index(t)
        meta[t] = {"numel": first.entries[t].numel, "shape": list(first.entries[t].shape),
                   "group": module_group(t), "layer": layer,
                   "third": depth_third(layer, n_layers) if layer is not None and layer < n_layers else None}
    writer = StreamingWriter(out / "gram.safetensors", [(t, (m, m), "F64") for t in rows.tensors])
    for t, s in zip(rows.tensors, stats):
        writer.write(t, torch.from_numpy(raw_gram(s.centred, rows.ref)))
    writer.close()
    atomic_write_text(out / "gram_meta.json", json.dumps({
        "models": rows.names[:n],
        "base": rows.names[n] if rows.has_base else None,
        "paths": {name: str(ck.path) for name, ck in zip(rows.names, rows.ckpts)},
        "fingerprints": {name: ck.fingerprint() for name, ck in zip(rows.names, rows.ckpts)},
        "num_layers": n_layers,
        "tensors": meta,
    }, indent=1))
    by_t = dict(zip(rows.tensors, stats))

    def scope(pred: Callable[[dict], bool]) -> PairStats | None:
        picked = [by_t[t] for t in rows.tensors if pred(meta[t])]
        return total(picked, m) if picked else None

    scopes: dict[str, PairStats | None] = {"": scope(lambda _: True)}
    for g in GROUPS:
        scopes[f"_{g}"] = scope(lambda d, g=g: d["group"] == g)
    for d in THIRDS:
        scopes[f"_d{d}"] = scope(lambda x, d=d: x["third"] == d)
    columns: dict[str, np.ndarray] = {}
    for suffix, s in scopes.items():
        feats = _features_or_nan(s, rows, n)
        for f in FEATURES:
            columns[f"s_{f}{suffix}"] = feats[f]
    a_idx, b_idx = np.nonzero(~np.eye(n, dtype=bool))
    names = np.array(rows.names[:n])
    table = pl.DataFrame({"a": names[a_idx], "b": names[b_idx],
                          **{c: v[a_idx, b_idx] for c, v in columns.items()}})
    _write_parquet(table, out / "structural.parquet")
    layer_frames = []
    for layer in range(n_layers):
        s = scope(lambda x, layer=layer: x["layer"] == layer)
        if s is None:
            continue
        feats = _features_or_nan(s, rows, n)
        layer_frames.append(pl.DataFrame({
            "a": names[a_idx], "b": names[b_idx],
            "layer": np.full(len(a_idx), layer, np.int64),
            "rel_depth": np.full(len(a_idx), (layer + 0.5) / n_layers),
            "third": np.full(len(a_idx), depth_third(layer, n_layers), np.int64),
            **{f"s_{f}": feats[f][a_idx, b_idx] for f in FEATURES},
        }))
    layers = pl.concat(layer_frames) if layer_frames else pl.DataFrame(
        schema={"a": pl.String, "b": pl.String, "layer": pl.Int64, "rel_depth": pl.Float64, "third": pl.Int64,
                **{f"s_{f}": pl.Float64 for f in FEATURES}})
    _write_parquet(layers, out / "structural_layers.parquet")


def _features_or_nan(s: PairStats | None, rows: Rows, n: int) -> dict[str, np.ndarray]:
    if s is None:  # e.g. a model without norm tensors, or an empty depth third
        return {f: np.full((n, n), np.nan) for f in FEATURES}
    return pair_features(s, rows.ref, n, rows.has_base)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    """Float columns with NaN (undefined features) are stored as nulls."""
    df = df.with_columns(pl.col(pl.Float64).fill_nan(None))
    df.write_parquet(path)


def _run_json(run: StructuralRun) -> dict:
    return {"models": run.models, "base": run.base, "tensors": run.tensors,
            "tensors_computed": run.tensors_computed, "bytes_read": run.bytes_read,
            "tensor_reads": run.tensor_reads, "entries_computed": run.entries_computed,
            "pairs_cached": run.pairs_cached, "seconds": run.seconds, "stream_seconds": run.stream_seconds}
