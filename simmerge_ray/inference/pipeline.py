"""The Ray Data probe pipeline for one model: pending probes -> actor pool -> cache chunks.

`map_batches` with a callable class and `ActorPoolStrategy(size=n)`: each actor loads the model
once (in `__init__`) and then serves batches; each batch is padded and masked, run, reduced to
per-probe records and written to the cache as one chunk. Several probe sets of the same model
(one per task, each with its own cache) share one pool, so a model is loaded once per actor,
not once per task. Only probes absent from their cache are fed in, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simmerge_ray.inference.cache import ProbeCache
from simmerge_ray.inference.settings import ProbeSettings, RunOptions
from simmerge_ray.probes.tokenize import TokenizedProbes


class InjectedInterruption(RuntimeError):
    """Raised by an actor when `RunOptions.fail_after_batches` says to stop (resumability tests)."""


class ProbeWorker:
    """Callable class for `map_batches`: one model per actor, one cache chunk per batch and job."""

    def __init__(self, model_dir: str, cache_dirs: list[str], settings: ProbeSettings, options: RunOptions) -> None:
        import torch

        from simmerge_ray.inference.backend import load_backend

        torch.set_num_threads(max(1, int(options.cpus_per_actor)))
        self.backend = load_backend(options.backend, Path(model_dir), dtype=settings.dtype,
                                    nvme_path=options.nvme_path)
        self.caches = [ProbeCache(Path(d)) for d in cache_dirs]
        self.settings = settings
        self.fail_after = options.fail_after_batches
        self.run_id = uuid.uuid4().hex[:8]
        self.batches_done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from simmerge_ray.inference.extract import pad_batch, probe_records

        if self.fail_after is not None and self.batches_done >= self.fail_after:
            raise InjectedInterruption(f"injected interruption after {self.batches_done} batches")
        seqs = [np.asarray(s).tolist() for s in batch["input_ids"]]
        ids, mask = pad_batch(seqs)
        records = probe_records(self.backend.forward(ids, mask), mask, self.settings)
        per_job: dict[int, dict[int, dict]] = {}
        for job, pid, rec in zip(batch["job"].tolist(), batch["probe_id"].tolist(), records):
            per_job.setdefault(job, {})[pid] = rec
        for job, recs in per_job.items():
            self.caches[job].write_chunk(recs, self.run_id, self.batches_done)
        self.batches_done += 1
        return {"job": batch["job"], "probe_id": batch["probe_id"], "tokens": np.asarray([len(s) for s in seqs])}


@dataclass(frozen=True)
class ProbeJob:
    """One probe set of the model and the cache its outputs go to."""

    probes: TokenizedProbes
    cache: ProbeCache


@dataclass(frozen=True)
class RunReport:
    """What one call ran for one job; `first_result_s` (actor start, model load, first batch)
    separates start-up from steady-state throughput."""

    probes_run: int
    tokens_run: int
    seconds: float
    first_result_s: float = 0.0
    first_result_tokens: int = 0


def _blocks(pending: list[tuple[int, int]], jobs: list[ProbeJob], batch_size: int, max_blocks: int) -> list:
    """Arrow blocks of whole batches (Ray Data does not form a batch across blocks), at most
    `max_blocks` of them so a pool of actors has several to share without tiny tasks."""
    import pyarrow as pa

    n_batches = -(-len(pending) // batch_size)
    rows_per_block = batch_size * -(-n_batches // max_blocks)
    blocks = []
    for start in range(0, len(pending), rows_per_block):
        rows = pending[start:start + rows_per_block]
        blocks.append(pa.table({
            "job": pa.array([j for j, _ in rows], pa.int64()),
            "probe_id": pa.array([p for _, p in rows], pa.int64()),
            "input_ids": pa.array([list(jobs[j].probes.ids[p]) for j, p in rows], pa.list_(pa.int64())),
        }))
    return blocks


def run_model_jobs(model_dir: Path, jobs: list[ProbeJob], settings: ProbeSettings, options: RunOptions, *,
                   progress: Callable[[int], object] | None = None) -> list[RunReport]:
    """Run every job's probes missing from its cache through one actor pool; one report per job.
    `progress(tokens)` is called per finished batch."""
    import ray

    pending = [(j, p) for j, job in enumerate(jobs) for p in sorted(set(range(job.probes.num_probes))
                                                                    - job.cache.done_ids())]
    if not pending:
        return [RunReport(0, 0, 0.0) for _ in jobs]
    # Longest first, so each batch holds similar lengths (little padding).
    pending.sort(key=lambda jp: -len(jobs[jp[0]].probes.ids[jp[1]]))
    ds = ray.data.from_arrow(_blocks(pending, jobs, options.batch_size, 4 * options.num_actors))
    out = ds.map_batches(
        ProbeWorker,
        fn_constructor_kwargs={"model_dir": str(model_dir), "cache_dirs": [str(j.cache.root) for j in jobs],
                               "settings": settings, "options": options},
        batch_size=options.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.num_actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor,
        **({"memory": options.memory_per_actor} if options.memory_per_actor else {}),
    )
    start = time.perf_counter()
    probes_run = [0] * len(jobs)
    tokens_run = [0] * len(jobs)
    first: tuple[float, int] | None = None
    for result in out.iter_batches(batch_size=None, batch_format="numpy"):
        for job, tokens in zip(result["job"].tolist(), result["tokens"].tolist()):
            probes_run[job] += 1
            tokens_run[job] += tokens
        batch_tokens = int(result["tokens"].sum())
        first = first or (time.perf_counter() - start, batch_tokens)
        if progress is not None:
            progress(batch_tokens)
    seconds = time.perf_counter() - start
    return [RunReport(probes_run[j], tokens_run[j], seconds, *(first or (0.0, 0))) for j in range(len(jobs))]


def run_model_probes(model_dir: Path, probes: TokenizedProbes, settings: ProbeSettings, options: RunOptions,
                     cache: ProbeCache, *, progress: Callable[[int], object] | None = None) -> RunReport:
    """One probe set of one model (see `run_model_jobs`)."""
    return run_model_jobs(model_dir, [ProbeJob(probes, cache)], settings, options, progress=progress)[0]
