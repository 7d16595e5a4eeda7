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

from dataclasses import dataclass

from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, plan_merge
from simmerge_ray.merge.piece_routes import PieceRoutes, open_inputs

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


def estimate_merge(spec: MergeSpec, opts: ExecOptions = ExecOptions()) -> MergeEstimate:
    plan = plan_merge(spec, opts)
    routes = PieceRoutes(spec, plan.tasks, open_inputs(spec), opts.stream_bytes, opts.chunk_elems)
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
