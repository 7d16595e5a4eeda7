"""`simmerge merge --dry-run`: what a merge will read, write, hold and take, without merging.

Everything `run_merge` checks before reading a tensor is checked here too (inputs, parameters,
tokenizer, output folder). Bytes and peak memory come from the engine's own decisions per work
unit (PieceRoutes.piece_cost); the time is the input bytes over the per-worker rates that
`benchmarks/bench_merge.py` measured on this project's 2-core VM (README, "Performance"), split
over the workers: another machine scales them, so the estimate is an order of magnitude, not a
promise. The command's start-up is not included: 0.3 s, plus 3-4 s of importing torch for
every method but the C kernel's linear combinations.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.pending_checkpoint import PendingCheckpoint
from simmerge_ray.io.safetensors_format import TensorEntry, tensor_nbytes
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, MergeLayout, plan_merge
from simmerge_ray.merge.intermediate_dir import plan_kept
from simmerge_ray.merge.multi import StageGraph
from simmerge_ray.merge.output_files import config_source, written_config
from simmerge_ray.merge.piece_routes import PieceRoutes
from simmerge_ray.merge.resume import StageKeys, find_kept, stage_folder, stages_to_run
from simmerge_ray.merge.tensor_plan import output_layers

# Input bytes per second per worker, by how the engine merges a tensor: medians of three runs of
# benchmarks/bench_merge.py (bf16, warm page cache, 2 workers). "whole" (SLERP and the other
# whole-tensor methods) is not benchmarked: a conservative guess.
INPUT_BYTES_PER_S = {"combination": 0.417e9, "chunked": 0.258e9, "whole": 0.1e9}


@dataclass(frozen=True)
class MergeEstimate:
    method: str
    placement: str
    workers: int
    tensors: int
    shards: int
    units: int
    bytes_read: int
    bytes_written: int
    peak_bytes_per_worker: int
    seconds: float


def estimate_merge(spec: MergeSpec, opts: ExecOptions = ExecOptions(),
                   pending: Mapping[str, Checkpoint] | None = None) -> MergeEstimate:
    """The estimate of one merge; `pending`: stand-ins for inputs not written yet (plan_merge)."""
    return _estimate(spec, plan_merge(spec, opts, pending), opts)


def _estimate(spec: MergeSpec, plan: MergeLayout, opts: ExecOptions) -> MergeEstimate:
    routes = PieceRoutes(spec, plan.tasks, plan.ckpts, opts.stream_bytes, opts.chunk_elems)
    read = peak = 0
    worker_seconds = 0.0
    for unit in plan.units:
        for piece in unit.pieces:
            r, held, kind = routes.piece_cost(piece)
            read += r
            peak = max(peak, held)
            worker_seconds += r / INPUT_BYTES_PER_S[kind]
    written = sum(layout.size for layout in plan.layouts.values())
    workers = min(opts.n_workers, max(1, len(plan.units)))
    seconds = worker_seconds / workers
    return MergeEstimate(spec.method.name, opts.placement, workers, len(plan.numels), len(plan.shards),
                         len(plan.units), read, written, peak, seconds)


def pending_output(spec: MergeSpec, plan: MergeLayout, path: Path) -> PendingCheckpoint:
    """What `spec` will write to `path`, indexed as Checkpoint.open will index it: the shards'
    tensors at their planned offsets, the config.json and tokenizer the output gets
    (output_files.write_side_files), so a later merge is planned on it before it exists."""
    entries = {}
    for shard in plan.shards:
        layout = plan.layouts[shard.file]
        for name, shape, code in shard.tensors:
            begin = layout.offsets[name]
            entries[name] = TensorEntry(name, code, tuple(shape), path / shard.file, begin,
                                        begin + tensor_nbytes(shape, code))
    source = config_source(spec, plan.ckpts, warn=False)
    config = {} if source is None else written_config(spec, source, output_layers(spec, plan.ckpts), plan.shards,
                                                      plan.vocab)
    if plan.vocab is not None:
        tokenizer = plan.vocab.tokenizer
    else:
        tokenizer = None if source is None else source.tokenizer_source()
    return PendingCheckpoint(path, config, entries, tokenizer=tokenizer)


@dataclass(frozen=True)
class StageEstimate:
    name: str
    final: bool  # written to --out; the others are intermediates in the work folder
    estimate: MergeEstimate
    runs: bool = True  # False: an earlier run's output is read instead (resumed), or nothing reads it
    kept_in: str | None = None  # where the output an earlier run kept is (resumed stages only)


@dataclass(frozen=True)
class GraphEstimate:
    """The estimates of a graph's merges in run order, and the most disk the intermediates this
    run writes hold at once beside the output (run_stages removes one once its last reader
    finished; --intermediate-dir keeps them all). The totals count the merges that run only:
    those an earlier run kept are resumed from (`kept_bytes` of them on disk already)."""

    stages: tuple[StageEstimate, ...]
    intermediate_peak: int
    kept_bytes: int = 0

    @property
    def running(self) -> tuple[StageEstimate, ...]:
        return tuple(s for s in self.stages if s.runs)

    @property
    def bytes_read(self) -> int:
        return sum(s.estimate.bytes_read for s in self.running)

    @property
    def bytes_written(self) -> int:
        return sum(s.estimate.bytes_written for s in self.running)

    @property
    def seconds(self) -> float:
        return sum(s.estimate.seconds for s in self.running)


def estimate_stages(graph: StageGraph, opts: ExecOptions = ExecOptions(),
                    specs: Mapping[str, MergeSpec] | None = None, out: Path | None = None,
                    keep_in: Path | None = None) -> GraphEstimate:
    """Estimate every merge of `graph` in its run order: a merge reading an earlier one's output
    is planned on that output's PendingCheckpoint, so the numbers are the ones of the merge run
    alone on the written intermediate. `specs`: the stages parsed already (by name), their earlier
    merges referred to by name (MergeSpec.from_dict's `pending`), as load_multi does. With `out`,
    the merges a run into `out` would resume from (kept by an interrupted run beside it, or in
    `keep_in`: --intermediate-dir, checked as the run checks it) are marked and not counted:
    found by their key files and a stat of the files keyed, no weight read."""
    resumed = resumable(graph, opts, out, keep_in) if out is not None else None
    made: dict[str, PendingCheckpoint] = {}
    found: list[StageEstimate] = []
    for stage in graph.stages:
        spec = (specs or {}).get(stage.name) or MergeSpec.from_dict(
            stage.config, root=graph.root, source=stage.source, seed=graph.seed,
            pending={d: Path(d) for d in stage.deps})
        if graph.provenance is not None:  # an earlier merge named as the run names it (remapped ids' warning)
            spec = replace(spec, provenance=graph.provenance(stage))
        plan = plan_merge(spec, opts, {d: made[d] for d in stage.deps})
        final = stage is graph.stages[-1]
        if not final:
            made[stage.name] = pending_output(spec, plan, Path(stage.name))
        runs = resumed is None or stage.name in resumed[0]
        kept_in = None if resumed is None else resumed[1].get(stage.name)
        found.append(StageEstimate(stage.name, final, _estimate(spec, plan, opts), runs, kept_in))
    written = {s.name: s.estimate.bytes_written for s in found}
    runs = {s.name for s in found if s.runs}
    kept = sum(_folder_bytes(Path(s.kept_in)) for s in found if s.kept_in is not None)
    return GraphEstimate(tuple(found), intermediate_peak(graph, written, runs, keep=keep_in is not None), kept)


def resumable(graph: StageGraph, opts: ExecOptions, out: Path, keep_in: Path | None = None
              ) -> tuple[set[str], dict[str, str]]:
    """The stages a run of `graph` into `out` merges, and the ones it reads as kept by an earlier
    run instead, with where each is: what run_stages decides, found the same way, nothing moved."""
    stages = list(graph.stages)
    keys = StageKeys(stages, graph.root, graph.seed, opts.compute_dtype, opts.allow_nonfinite)
    if keep_in is not None:
        kept = plan_kept(keep_in, stages, keys, out=Path(out), overwrite=opts.overwrite, inputs=graph.inputs)
        return {s.name for s in kept.todo}, {n: str(stage_folder(kept.folder, n)) for n in kept.reused}
    _, found = find_kept(Path(out), None, stages, keys)
    todo, reused = stages_to_run(stages, found)
    return {s.name for s in todo}, {n: str(stage_folder(found[n], n)) for n in reused}


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (stat only)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def intermediate_peak(graph: StageGraph, written: Mapping[str, int], runs: Collection[str], *,
                      keep: bool) -> int:
    """The most bytes of intermediates a run writes on disk at once, as run_stages keeps them: a
    merge's output exists from its own run (written in place) until every merge still to run
    reading it finished (with `keep`, --intermediate-dir's, to the end); the final's output (--out)
    is not counted, nor are the outputs of the stages not in `runs` (resumed: on disk already)."""
    stages = list(graph.stages)
    todo = [s for s in stages if s.name in runs]
    alive: dict[str, int] = {}
    peak = 0
    for i, stage in enumerate(todo):
        if stage is not stages[-1]:
            alive[stage.name] = written[stage.name]
        peak = max(peak, sum(alive.values()))
        for d in () if keep else stage.deps:  # read by no merge still to run: removed
            if not any(d in later.deps for later in todo[i + 1:]):
                alive.pop(d, None)
    return peak
