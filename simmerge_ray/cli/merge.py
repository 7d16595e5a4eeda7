"""`simmerge merge CONFIG.yaml --out DIR`: run a mergekit-style merge on Ray, streaming."""

from __future__ import annotations

import argparse

from simmerge_ray.cli.common import init_ray


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="execute a mergekit YAML config (streaming, on Ray)")
    p.add_argument("config", help="mergekit-style YAML (models/slices, merge_method, parameters, dtype)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--workers", type=int, default=2, help="merge actors (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--shard-size", default="512M", help="output shard size, e.g. 512M, 2G")
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic methods (DARE)")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf results instead of failing")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.merge.config import MergeSpec
    from simmerge_ray.merge.executor import ExecOptions, run_merge

    spec = MergeSpec.load(args.config, seed=args.seed)
    init_ray(args.address)
    opts = ExecOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       shard_bytes=parse_size(args.shard_size), allow_nonfinite=args.allow_nonfinite,
                       overwrite=args.overwrite)
    res = run_merge(spec, args.out, opts)
    print(f"merged {len(spec.inputs)} models with {spec.method.name}: {res.tensors} tensors in "
          f"{res.shards} shard(s) -> {res.out}")
    print(f"read {res.bytes_read / 1e9:.3f} GB, wrote {res.bytes_written / 1e9:.3f} GB in {res.seconds:.1f} s "
          f"({res.read_gbps:.2f} GB/s input)")
    return 0
