"""Where a merge's work units run: threads of the command's own process, or a pool of Ray actors.

Both drive the same `UnitMerger` over the same units and offsets, so the output bytes are the
same in every placement. The local placement starts nothing: torch releases the GIL in its
kernels and the file reads and writes, so threads over units use every core without a cluster.
The Ray placement is for a cluster (`ray job submit`, KubeRay): actors are restarted and their
units retried when a worker or its node is lost.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.piece_routes import PieceRoutes, open_inputs
from simmerge_ray.merge.progress import Progress
from simmerge_ray.merge.tensor_plan import TensorTask
from simmerge_ray.merge.unit_merger import UnitMerger
from simmerge_ray.merge.units import WorkUnit
from simmerge_ray.resources import SizeFrom


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_local(spec: MergeSpec, tasks: dict[str, TensorTask], units: list[WorkUnit], partial: dict[str, Path],
              *, workers: int, threads_per_worker: int, stream_bytes: int, chunk_elems: int,
              allow_nonfinite: bool, progress: Progress, worker_cls: type[UnitMerger] = UnitMerger) -> list[dict]:
    """Units over `workers` threads, each with its own UnitMerger (buffers, file handles)."""
    n = max(1, min(workers, len(units)))
    local = threading.local()

    def merger() -> UnitMerger:
        if getattr(local, "merger", None) is None:
            local.merger = worker_cls(spec, tasks, stream_bytes, chunk_elems, progress=progress.advance)
        return local.merger

    # torch (when the merge needs it: a linear merge by the C kernel never imports it) runs
    # threads_per_worker threads per op during the merge, restored afterwards
    uses_torch = PieceRoutes(spec, tasks, open_inputs(spec), stream_bytes, chunk_elems).uses_torch(units)
    saved = torch.get_num_threads() if uses_torch else None
    if saved is not None:
        torch.set_num_threads(max(1, threads_per_worker))
    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="merge-worker") as pool:
            futures = [pool.submit(lambda u=u: merger().run(u, partial, allow_nonfinite)) for u in units]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
            return [f.result() for f in futures]
    finally:
        if saved is not None:
            torch.set_num_threads(saved)


def run_on_ray(spec: MergeSpec, tasks: dict[str, TensorTask], units: list[WorkUnit], partial: dict[str, Path],
               *, workers: int, workers_from: SizeFrom | None, cpus_per_worker: float, memory_per_worker: int | None,
               resources: dict[str, float] | None, max_retries: int, stream_bytes: int, chunk_elems: int,
               allow_nonfinite: bool, progress: Progress, worker_cls: type[UnitMerger] = UnitMerger
               ) -> tuple[list[dict], int]:
    """Units over a pool of restartable actors; a lost worker's unit is retried. Results in unit
    order, and the workers the pool started (a default count is cut to what the cluster holds)."""
    import ray

    from simmerge_ray.actor_pool import ActorPool
    from simmerge_ray.resources import ResourceAsk

    ask = ResourceAsk(cpus_per_worker, 0.0, memory_per_worker)
    tasks_ref = ray.put(tasks)
    results: list[dict] = [{}] * len(units)
    with ActorPool(worker_cls, min(workers, len(units)), ask, what="merge worker", resources=resources,
                   size_from=workers_from, max_retries=max_retries, args=(spec, tasks_ref, stream_bytes, chunk_elems,
                                                  int(max(1, cpus_per_worker)))) as pool:
        # Units are cut for `workers` workers: start them all before handing any out, so each
        # shares the work from the first unit; two calls in flight per actor keep the next unit
        # queued while the driver handles a result.
        pool.wait_ready()
        for k, result in pool.map_unordered("run", units, in_flight=2, args=(partial, allow_nonfinite)):
            results[k] = result
            u = units[k]
            progress.advance(u.elems, sum(p.last for p in u.pieces))
        started = len(pool.actors)
    return results, started
