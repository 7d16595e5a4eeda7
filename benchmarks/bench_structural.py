"""Benchmark: structural features of a catalog in one Gram pass, against (a) the naive pairwise
way (every pair reads both models and the base) and (b) the read limit, measured in the same
run as a plain pass that only sums the same files with the same reader and actor pool.

    .venv/bin/python -m benchmarks.bench_structural                  # 8 x ~0.5 GB bf16 + base
    .venv/bin/python -m benchmarks.bench_structural --scale 0.1      # a quick, smaller run

Checkpoints are generated once under --root and reused. Prints a table and writes JSON.
Targets (from the issue): Gram pass >= 3x faster than naive; >= 60% of the plain pass's GB/s.
Both passes read the memory-mapped shards and are timed from a started actor pool to the last
result; the Gram pass's end-to-end time (pool start-up, validation, output files) is reported
beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from simmerge_ray import resources
from simmerge_ray.catalog import Catalog
from simmerge_ray.ray_session import init_ray
from simmerge_ray.actor_pool import ActorPool
from simmerge_ray.features.structural import (StructuralOptions, compute_structural, open_rows,
                                              tensor_batches)
from simmerge_ray.features.structural_reads import ChunkReader
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint


def spec_for(scale: float, seed: int) -> SyntheticSpec:
    """A llama of ~0.5 GB bf16 at scale 1 (14 layers, hidden 1024, MLP 4096, vocab 8192)."""
    layers = max(2, round(14 * scale))
    return SyntheticSpec(architecture="llama", hidden_size=1024, num_layers=layers, num_heads=16,
                         intermediate_size=4096, vocab_size=8192, seed=seed, dtype="bfloat16",
                         max_shard_bytes=200 * 1024**2)


def ensure_catalog(root: Path, n_models: int, scale: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base").exists():
        make_checkpoint(root / "base", spec_for(scale, 0))
    for i in range(n_models):
        if not (root / f"ft{i}").exists():
            print(f"generating ft{i} ...", flush=True)
            make_checkpoint(root / f"ft{i}", spec_for(scale, 1 + i), base=root / "base", delta_std=0.002)
    cat = root / f"catalog-{n_models}.yaml"
    cat.write_text("base: base\nmodels:\n" + "".join(f"  - {{name: ft{i}, path: ft{i}}}\n" for i in range(n_models)))
    return cat


def pair_catalog(root: Path, a: str, b: str) -> Path:
    path = root / f"pair-{a}-{b}.yaml"
    path.write_text(f"base: base\nmodels:\n  - {{name: {a}, path: {a}}}\n  - {{name: {b}, path: {b}}}\n")
    return path


class SumWorker:
    """The read-limit pass: same reader, same chunks, and only a sum of what was read."""

    def __init__(self, paths: list[str], chunk_elems: int, as_float: bool) -> None:
        torch.set_num_threads(1)
        self.ckpts = [Checkpoint.open(p) for p in paths]
        self.chunk_elems, self.as_float = chunk_elems, as_float

    def run(self, tensors: list[str]) -> tuple[int, float]:
        reader = ChunkReader(self.ckpts, self.chunk_elems)
        acc = 0.0
        for t in tensors:
            for parts in reader.raw_chunks(t):
                for p in parts:
                    if self.as_float:
                        acc += float(p.sum(dtype=torch.float32))
                    else:  # every byte touched, as 8-byte words: the cheapest full reduction
                        acc += float(p.view(torch.uint8).numpy().view(np.uint64).sum(dtype=np.uint64))
        return sum(reader.bytes_read), acc


def sum_pass(catalog: Path, workers: int, chunk_elems: int, as_float: bool) -> dict:
    """The same tensors to the same actors in the same batches as the Gram pass."""
    rows = open_rows(Catalog.load(catalog))
    size = {t: sum(c.entries[t].nbytes for c in rows.ckpts) for t in rows.tensors}
    with ActorPool(SumWorker, workers, resources.streaming_ask(), what="sum actor",
                   size_from=resources.SizeFrom(f"--workers {workers}"),
                   args=([str(c.path) for c in rows.ckpts], chunk_elems, as_float)) as pool:
        pool.wait_ready()  # actor start-up is not read time
        t0 = time.perf_counter()
        out = [r for _, r in pool.map_unordered("run", tensor_batches(rows.tensors, size, workers))]
        seconds = time.perf_counter() - t0
    nbytes = sum(b for b, _ in out)
    return {"seconds": seconds, "bytes": nbytes, "gbps": nbytes / 1e9 / seconds}


def gram_pass(catalog: Path, out: Path, workers: int, chunk_elems: int, precision: str) -> dict:
    """`gbps` is over the streaming part (pool ready to last result), as the plain pass is timed;
    `gbps_end_to_end` adds the actor pool's start-up, the validation and the output files."""
    run = compute_structural(Catalog.load(catalog), out,
                             StructuralOptions(workers=workers, chunk_elems=chunk_elems, precision=precision,
                                               use_cache=False, overwrite=True))
    nbytes = run.total_bytes_read
    return {"precision": precision, "seconds": run.stream_seconds, "seconds_end_to_end": run.seconds,
            "bytes": nbytes, "gbps": nbytes / 1e9 / run.stream_seconds, "gbps_end_to_end": nbytes / 1e9 / run.seconds,
            "compute_seconds": sum(run.per_tensor_seconds)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median streaming time, with every run's seconds beside it."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return mid | {"seconds_all": [r["seconds"] for r in runs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=REPO / "runs" / "bench" / "structural_ckpts")
    p.add_argument("--json", type=Path, default=REPO / "runs" / "bench" / "structural.json")
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0, help="model size relative to ~0.5 GB")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-elems", type=int, default=StructuralOptions.chunk_elems)
    p.add_argument("--repeats", type=int, default=3, help="runs of each pass; the median is reported")
    p.add_argument("--naive-pairs", type=int, default=0,
                   help="time only this many pairs of the naive way and extrapolate (0: all pairs)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    catalog = ensure_catalog(args.root, args.models, args.scale)
    names = [f"ft{i}" for i in range(args.models)]
    for n in names + ["base"]:
        Checkpoint.open(args.root / n).fingerprint()  # file digests are cached: not part of any timing
    init_ray(num_cpus=max(args.workers, 2))
    model_gb = Checkpoint.open(args.root / "ft0").nbytes / 1e9
    work = args.root.parent / "structural_out"

    sum_pass(catalog, args.workers, args.chunk_elems, False)  # warm the page cache: every pass reads warm
    runs: dict[str, list[dict]] = {"plain": [], "plain_f": [], "gram": [], "gram64": []}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every pass
        runs["plain"].append(sum_pass(catalog, args.workers, args.chunk_elems, False))
        runs["plain_f"].append(sum_pass(catalog, args.workers, args.chunk_elems, True))
        runs["gram"].append(gram_pass(catalog, work / "gram", args.workers, args.chunk_elems, "float32"))
        runs["gram64"].append(gram_pass(catalog, work / "gram", args.workers, args.chunk_elems, "float64"))
    plain, plain_f, gram, gram64 = (median_run(runs[k]) for k in ("plain", "plain_f", "gram", "gram64"))

    pairs = list(itertools.combinations(names, 2))
    timed = pairs[: args.naive_pairs] if args.naive_pairs else pairs
    naive_s, naive_bytes = 0.0, 0
    for a, b in timed:
        r = gram_pass(pair_catalog(args.root, a, b), work / "pair", args.workers, args.chunk_elems, "float32")
        naive_s += r["seconds_end_to_end"]
        naive_bytes += r["bytes"]
        print(f"  naive pair {a}-{b}: {r['seconds']:.1f} s", flush=True)
    naive_total = naive_s * len(pairs) / len(timed)

    result = {
        "models": args.models, "model_gb": model_gb, "with_base": True, "workers": args.workers,
        "repeats": args.repeats,
        "chunk_elems": args.chunk_elems, "cpus": os.cpu_count(),
        "plain_sum_bytes": plain, "plain_sum_float": plain_f, "gram_pass": gram, "gram_pass_float64": gram64,
        "naive": {"pairs": len(pairs), "pairs_timed": len(timed), "seconds_timed": naive_s,
                  "bytes_timed": naive_bytes, "seconds_estimated_all": naive_total},
        "speedup_vs_naive": naive_total / gram["seconds_end_to_end"],
        "throughput_vs_plain_sum": gram["gbps"] / plain["gbps"],
        "throughput_vs_plain_sum_per_repeat": [p["seconds"] / g["seconds"] for p, g in zip(runs["plain"], runs["gram"])],
        "throughput_vs_plain_float_sum": gram["gbps"] / plain_f["gbps"],
        "throughput_vs_plain_sum_float64": gram64["gbps"] / plain["gbps"],
        "throughput_end_to_end_vs_plain_sum": gram["gbps_end_to_end"] / plain["gbps"],
    }
    rows = [
        ("plain pass, byte sum (read limit)", plain["seconds"], plain["bytes"], plain["gbps"]),
        ("plain pass, float32 sum", plain_f["seconds"], plain_f["bytes"], plain_f["gbps"]),
        ("Gram pass, float32 (default), streaming", gram["seconds"], gram["bytes"], gram["gbps"]),
        ("Gram pass, float32, end to end (pool start, outputs)", gram["seconds_end_to_end"], gram["bytes"],
         gram["gbps_end_to_end"]),
        ("Gram pass, float64, streaming", gram64["seconds"], gram64["bytes"], gram64["gbps"]),
        (f"naive pairwise ({len(timed)}/{len(pairs)} pairs timed, total est.)", naive_total,
         naive_bytes * len(pairs) // len(timed), naive_bytes * len(pairs) / len(timed) / 1e9 / naive_total),
    ]
    print(f"\n{args.models} models + base, {model_gb:.2f} GB each, {args.workers} actors, "
          f"{os.cpu_count()} CPUs; median of {args.repeats} runs of each pass")
    print(f"{'pass':58s} {'seconds':>9s} {'GB read':>9s} {'GB/s':>7s}")
    for name, s, b, g in rows:
        print(f"{name:58s} {s:9.1f} {b / 1e9:9.2f} {g:7.3f}")
    print(f"\nGram pass vs naive (end to end, both): {result['speedup_vs_naive']:.1f}x faster (target >= 3x)")
    print(f"Gram pass throughput: {100 * result['throughput_vs_plain_sum']:.0f}% of the byte-sum pass, "
          f"{100 * result['throughput_vs_plain_float_sum']:.0f}% of the float-sum pass (target >= 60%); "
          f"float64: {100 * result['throughput_vs_plain_sum_float64']:.0f}%; end to end: "
          f"{100 * result['throughput_end_to_end_vs_plain_sum']:.0f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
