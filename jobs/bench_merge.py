"""Benchmark: `simmerge merge` (1 and 2 workers) against `mergekit-yaml` on the same YAML.

Builds three synthetic llama checkpoints of about --size-gb each (bf16, sharded; reused when
present), then merges them with each tool in turn, sampling the proportional set size (PSS) of
the whole process tree every 50 ms: PSS counts shared pages once, so a Ray driver plus its
workers and a single mergekit process are measured on the same footing. `simmerge merge` runs
twice per worker count: cold (the command starts a local Ray, as on a laptop) and joining a
running Ray cluster (as a `ray job submit` does; the cluster's daemons and workers are counted
in its memory); and once with `--in-process` (one worker in the command's own process, no Ray). The inputs are read once before timing, so every tool starts from a warm page
cache. Prints a table and writes JSON.

    python jobs/bench_merge.py --size-gb 1.5 --out runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from simmerge_ray.io.checkpoint import Checkpoint  # noqa: E402
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint  # noqa: E402

from _measure import ray_head, timed  # noqa: E402


def spec_for(size_gb: float) -> SyntheticSpec:
    """A llama shape whose bf16 size is about `size_gb` (hidden 2048, ~100M params per 3 layers)."""
    hidden, vocab, inter = 2048, 32000, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    fixed = 2 * vocab * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return SyntheticSpec(architecture="llama", hidden_size=hidden, num_layers=layers, num_heads=16,
                         intermediate_size=inter, vocab_size=vocab, dtype="bfloat16",
                         max_shard_bytes=500 * 1024**2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--method", default="linear", choices=["linear", "ties"])
    args = ap.parse_args()
    root = Path(args.out).resolve()
    ckpt_dir = root / f"merge-ckpts-{args.size_gb:g}gb"
    spec = spec_for(args.size_gb)
    names = ["base", "m1", "m2"]
    for i, name in enumerate(names):
        if not (ckpt_dir / name / "config.json").exists():
            print(f"generating {ckpt_dir / name} ...", flush=True)
            make_checkpoint(ckpt_dir / name, dataclasses.replace(spec, seed=i), overwrite=True)
    in_bytes = sum(Checkpoint.open(ckpt_dir / n).nbytes for n in names)
    if args.method == "linear":
        cfg = {"merge_method": "linear", "dtype": "bfloat16",
               "models": [{"model": str(ckpt_dir / n), "parameters": {"weight": 1.0}} for n in names]}
    else:
        cfg = {"merge_method": "ties", "dtype": "bfloat16", "base_model": str(ckpt_dir / "base"),
               "models": [{"model": str(ckpt_dir / n), "parameters": {"weight": 0.5, "density": 0.5}}
                          for n in names[1:]]}
    cfg_path = root / f"bench-merge-{args.method}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    bin_dir = Path(sys.executable).parent
    sm = [str(bin_dir / "simmerge"), "merge", str(cfg_path)]
    runs = {
        "simmerge, 1 worker, cold": (sm + ["--workers", "1"], None),
        "simmerge, 2 workers, cold": (sm + ["--workers", "2"], None),
        "simmerge --in-process (no Ray)": (sm + ["--in-process"], None),
        "simmerge, 1 worker, on a cluster": (sm + ["--workers", "1"], "cluster"),
        "simmerge, 2 workers, on a cluster": (sm + ["--workers", "2"], "cluster"),
        "mergekit-yaml": ([str(bin_dir / "mergekit-yaml"), str(cfg_path)], None),
    }
    for name in names:  # warm the page cache: no tool pays for the first read from disk
        for f in (ckpt_dir / name).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    results: dict[str, dict] = {}
    out = root / "merge-out"

    def measure(label: str, cmd: list[str], group: int | None = None) -> None:
        shutil.rmtree(out, ignore_errors=True)
        print(f"running {label} ...", flush=True)
        r = timed(cmd, env, group=group)
        r["input_gbps"] = in_bytes / 1e9 / r["seconds"]
        results[label] = r
        shutil.rmtree(out, ignore_errors=True)

    for label, (cmd, where) in runs.items():
        if where is None:
            extra = ["--out", str(out)] if cmd[1] == "merge" else [str(out), "--no-copy-tokenizer"]
            measure(label, cmd + extra)
    # The cluster is started only now, so its idle daemons do not share the machine with the runs above.
    with ray_head(bin_dir / "ray", env, num_cpus=os.cpu_count() or 2) as (address, group):
        for label, (cmd, where) in runs.items():
            if where is not None:
                measure(label, cmd + ["--out", str(out), "--address", address], group)
    results = {label: results[label] for label in runs}
    mk = results["mergekit-yaml"]
    print(f"\n{args.method} merge of 3 x {in_bytes / 3e9:.2f} GB bf16 checkpoints ({os.cpu_count()} CPUs)")
    print(f"{'tool':<36}{'seconds':>9}{'input GB/s':>12}{'peak PSS GB':>13}{'peak RSS GB':>13}{'speed vs mk':>13}"
          f"{'PSS vs mk':>11}")
    for label, r in results.items():
        print(f"{label:<36}{r['seconds']:>9.1f}{r['input_gbps']:>12.3f}{r['peak_pss_gb']:>13.2f}"
              f"{r['peak_rss_gb']:>13.2f}{r['input_gbps'] / mk['input_gbps']:>12.2f}x"
              f"{r['peak_pss_gb'] / mk['peak_pss_gb']:>10.2f}x")
    report = {"method": args.method, "input_bytes": in_bytes, "cpus": os.cpu_count(), "results": results}
    (root / f"bench_merge_{args.method}.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {root / f'bench_merge_{args.method}.json'}")


if __name__ == "__main__":
    main()
