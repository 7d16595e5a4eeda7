"""The Ray Data probe pipeline: pending probes of one or many models -> actor pool -> cache chunks.

`map_batches` with a callable class and `ActorPoolStrategy(size=n)`: each batch is padded and
masked, run, reduced to per-probe records and written to its cache as one chunk. One pool serves
a whole catalog: rows are grouped by model (a block never mixes models), and an actor loads a
model when its first block of that model arrives, keeping one model loaded at a time. The
pool's start-up (a fresh process imports torch and transformers, Ray Data plans the dataset) is
paid once per catalog, not once per model. Several probe sets of a model (one per task, each
with its own cache) are served by the same load. Only probes absent from their cache are fed in,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np

from simmerge_ray.errors import surfacing_remote_errors
from simmerge_ray.inference.cache import ProbeCache
from simmerge_ray.inference.settings import ProbeSettings, RunOptions
from simmerge_ray.probes.tokenize import TokenizedProbes


class InjectedInterruption(RuntimeError):
    """Raised by an actor when `RunOptions.fail_after_batches` says to stop (resumability tests)."""


class ProbeWorker:
    """Callable class for `map_batches`: serves batches of any of `model_dirs`, loading a model
    when a batch of it arrives (one model held at a time); one cache chunk per batch and job."""

    def __init__(self, model_dirs: list[str], cache_dirs: list[list[str]], settings: ProbeSettings,
                 options: RunOptions) -> None:
        import torch

        torch.set_num_threads(max(1, int(options.cpus_per_actor)))
        self.model_dirs = model_dirs
        self.caches = [[ProbeCache(Path(d)) for d in dirs] for dirs in cache_dirs]
        self.settings = settings
        self.options = options
        self.fail_after = options.fail_after_batches
        self.run_id = uuid.uuid4().hex[:8]
        self.batches_done = 0
        self.loaded: int | None = None
        self.backend = None

    def _use(self, model: int) -> None:
        from simmerge_ray.inference.backend import load_backend

        if model != self.loaded:
            self.backend = None  # release the previous model before loading the next
            self.backend = load_backend(self.options.backend, Path(self.model_dirs[model]),
                                        dtype=self.settings.dtype, nvme_path=self.options.nvme_path)
            self.loaded = model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from simmerge_ray.inference.extract import pad_batch, probe_records

        if self.fail_after is not None and self.batches_done >= self.fail_after:
            raise InjectedInterruption(f"injected interruption after {self.batches_done} batches")
        seqs = [np.asarray(s).tolist() for s in batch["input_ids"]]
        busy = 0.0
        models = batch["model"].tolist()
        for model in sorted(set(models)):  # one model per batch, as blocks never mix models
            rows = [i for i, m in enumerate(models) if m == model]
            self._use(model)  # loading a model is start-up, not batch time
            start = time.perf_counter()
            ids, mask = pad_batch([seqs[i] for i in rows])
            records = probe_records(self.backend.forward(ids, mask), mask, self.settings)
            per_job: dict[int, dict[int, dict]] = {}
            for i, rec in zip(rows, records):
                per_job.setdefault(int(batch["job"][i]), {})[int(batch["probe_id"][i])] = rec
            for job, recs in per_job.items():
                self.caches[model][job].write_chunk(recs, self.run_id, self.batches_done)
            busy += time.perf_counter() - start
        self.batches_done += 1
        return {"model": batch["model"], "job": batch["job"], "probe_id": batch["probe_id"],
                "tokens": np.asarray([len(s) for s in seqs]),
                "busy_s": np.full(len(seqs), busy / len(seqs))}  # the batch's time, spread over its rows


@dataclass(frozen=True)
class ProbeJob:
    """One probe set of the model and the cache its outputs go to."""

    probes: TokenizedProbes
    cache: ProbeCache


@dataclass(frozen=True)
class RunReport:
    """What one call ran for one job. `busy_seconds`: actor time spent in this job's batches
    (padding, forward, extraction, cache writes; not loading models), summed over actors, which
    separates steady-state throughput from start-up (process, imports, model load)."""

    probes_run: int
    tokens_run: int
    seconds: float
    busy_seconds: float = 0.0


@dataclass(frozen=True)
class ModelWork:
    """One model and its probe sets."""

    model_dir: Path
    jobs: list[ProbeJob]


def _blocks(pending: list[tuple[int, int, int]], work: list[ModelWork], batch_size: int, max_blocks: int) -> list:
    """Arrow blocks of whole batches of one model each (Ray Data does not form a batch across
    blocks), at most `max_blocks` per model so a pool of actors has several to share."""
    import pyarrow as pa

    blocks = []
    for _, group in groupby(pending, key=lambda r: r[0]):  # `pending` is sorted by model
        mine = list(group)
        n_batches = -(-len(mine) // batch_size)
        rows_per_block = batch_size * -(-n_batches // max_blocks)
        for start in range(0, len(mine), rows_per_block):
            rows = mine[start:start + rows_per_block]
            blocks.append(pa.table({
                "model": pa.array([r[0] for r in rows], pa.int64()),
                "job": pa.array([r[1] for r in rows], pa.int64()),
                "probe_id": pa.array([r[2] for r in rows], pa.int64()),
                "input_ids": pa.array([list(work[r[0]].jobs[r[1]].probes.ids[r[2]]) for r in rows], pa.list_(pa.int64())),
            }))
    return blocks


def check_probe_actor(options: RunOptions) -> None:
    """A probe actor no node can hold is one line (Ray Data would only warn that the pool "may
    hang forever", and wait). Ray must be initialised."""
    from simmerge_ray import placement
    from simmerge_ray.resources import ENV_VARS, ResourceAsk

    set_by = ", ".join(ENV_VARS[k] for k in ("cpus_per_inference_actor", "gpus_per_inference_actor",
                                            "memory_per_inference_actor"))
    placement.check_placeable(f"a probe actor ({set_by})",
                              ResourceAsk(options.cpus_per_actor, options.gpus_per_actor, options.memory_per_actor))


def run_jobs(work: list[ModelWork], settings: ProbeSettings, options: RunOptions, *,
             progress: Callable[[int, int], object] | None = None) -> list[list[RunReport]]:
    """Run every model's probes missing from their caches through one actor pool; a report per
    model and job. `progress(model, tokens)` is called per finished batch."""
    import ray

    pending = [(m, j, p) for m, w in enumerate(work) for j, job in enumerate(w.jobs)
               for p in sorted(set(range(job.probes.num_probes)) - job.cache.done_ids())]
    if not pending:
        return [[RunReport(0, 0, 0.0) for _ in w.jobs] for w in work]
    check_probe_actor(options)
    # By model, then longest first, so each batch holds similar lengths (little padding).
    pending.sort(key=lambda r: (r[0], -len(work[r[0]].jobs[r[1]].probes.ids[r[2]])))
    # from_blocks keeps the blocks as cut and takes their metadata here; from_arrow would run a
    # remote task for it, which on a fresh cluster waits for a worker process (1.3-1.8 s here).
    from_blocks = getattr(ray.data, "from_blocks", ray.data.from_arrow)  # DeveloperAPI in Ray 2.60
    blocks = _blocks(pending, work, options.batch_size, 4 * options.num_actors)
    ds = from_blocks(blocks)
    out = ds.map_batches(
        ProbeWorker,
        fn_constructor_kwargs={"model_dirs": [str(w.model_dir) for w in work],
                               "cache_dirs": [[str(j.cache.root) for j in w.jobs] for w in work],
                               "settings": settings, "options": options},
        batch_size=options.batch_size,
        batch_format="numpy",
        # no more actors than blocks: the rest would start, load nothing, and make Ray Data warn
        compute=ray.data.ActorPoolStrategy(size=min(options.num_actors, len(blocks))),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor,
        **({"memory": options.memory_per_actor} if options.memory_per_actor else {}),
    )
    start = time.perf_counter()
    probes_run = [[0] * len(w.jobs) for w in work]
    tokens_run = [[0] * len(w.jobs) for w in work]
    busy = [[0.0] * len(w.jobs) for w in work]
    # A model an actor refused (config against weights...): its one line, not Ray Data's traceback.
    for result in surfacing_remote_errors(out.iter_batches(batch_size=None, batch_format="numpy")):
        for m, job, tokens, b in zip(result["model"].tolist(), result["job"].tolist(), result["tokens"].tolist(),
                                     result["busy_s"].tolist()):
            probes_run[m][job] += 1
            tokens_run[m][job] += tokens
            busy[m][job] += b
            if progress is not None:
                progress(m, tokens)
    seconds = time.perf_counter() - start
    return [[RunReport(probes_run[m][j], tokens_run[m][j], seconds, busy[m][j]) for j in range(len(w.jobs))]
            for m, w in enumerate(work)]


def run_model_probes(model_dir: Path, probes: TokenizedProbes, settings: ProbeSettings, options: RunOptions,
                     cache: ProbeCache, *, progress: Callable[[int], object] | None = None) -> RunReport:
    """One probe set of one model (see `run_jobs`)."""
    prog = (lambda _m, tokens: progress(tokens)) if progress is not None else None
    return run_jobs([ModelWork(Path(model_dir), [ProbeJob(probes, cache)])], settings, options, progress=prog)[0][0]
