"""Benchmark: `simmerge merge` against `mergekit-yaml` and the I/O floor, same machine, same run.

Builds three synthetic llama checkpoints of about --size-gb each (bf16, sharded; reused when
present) and, per method (linear over the three; TIES of two over the third as base, density
0.5), times in turn:
- the I/O floor: read every input once, write the output's bytes once and sync, on as many
  threads as CPUs (benchmarks/io_floor.py; its own time, without an interpreter's start-up),
  the time no merge can beat here;
- `simmerge merge CONFIG --out DIR` with no flags (threads in the command's own process);
- `simmerge merge ... --address` on a running Ray cluster, as `ray job submit` runs it
  (`--skip-cluster` leaves it out);
- `mergekit-yaml` on the same YAML.
Each run samples the proportional set size (PSS) of its whole process tree every 50 ms (PSS
counts shared pages once; on the cluster the head's daemons and workers count too). Inputs are
read once before timing, so every run starts from a warm page cache. Prints a table, writes JSON.

    python -m benchmarks.bench_merge --size-gb 1.07 --out runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from benchmarks.measure import ray_head, timed
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

NAMES = ("base", "m1", "m2")


def spec_for(size_gb: float) -> SyntheticSpec:
    """A llama shape whose bf16 size is about `size_gb` (hidden 2048, ~100M params per 3 layers)."""
    hidden, vocab, inter = 2048, 32000, 5632
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    fixed = 2 * vocab * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return SyntheticSpec(architecture="llama", hidden_size=hidden, num_layers=layers, num_heads=16,
                         intermediate_size=inter, vocab_size=vocab, dtype="bfloat16",
                         max_shard_bytes=500 * 1024**2)


def linear_config(ckpt_dir: Path) -> dict:
    """Linear over the three checkpoints."""
    return {"merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": str(ckpt_dir / n), "parameters": {"weight": 1.0}} for n in NAMES]}


def ties_config(ckpt_dir: Path) -> dict:
    """TIES of two checkpoints over the third as base, density 0.5."""
    return {"merge_method": "ties", "dtype": "bfloat16", "base_model": str(ckpt_dir / "base"),
            "models": [{"model": str(ckpt_dir / n), "parameters": {"weight": 0.5, "density": 0.5}} for n in NAMES[1:]]}


# The benchmarked merges, by the method each config names (the --methods choices).
CONFIGS: dict[str, Callable[[Path], dict]] = {"linear": linear_config, "ties": ties_config}


def _workers(output: str) -> int:
    found = re.search(r"; (\d+) (?:thread|Ray actor)", output)
    return int(found.group(1)) if found else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.07, help="size of each of the three checkpoints")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--skip-cluster", action="store_true", help="leave out the run on a Ray cluster")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    ckpt_dir = root / f"merge-ckpts-{args.size_gb:g}gb"
    spec = spec_for(args.size_gb)
    for i, name in enumerate(NAMES):
        if not (ckpt_dir / name / "config.json").exists():
            print(f"generating {ckpt_dir / name} ...", flush=True)
            make_checkpoint(ckpt_dir / name, dataclasses.replace(spec, seed=i), overwrite=True)
    files = [f for n in NAMES for f in sorted((ckpt_dir / n).glob("*.safetensors"))]
    out_bytes = Checkpoint.open(ckpt_dir / "base").nbytes
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    bin_dir = Path(sys.executable).parent
    out = root / "merge-out"
    for f in files:  # warm the page cache: no tool pays for the first read from disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    def measure(cmd: list[str], group: int | None = None) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        r = timed(cmd, env, group=group)
        shutil.rmtree(out, ignore_errors=True)
        return r

    report: dict = {"input_bytes": sum(f.stat().st_size for f in files), "output_bytes": out_bytes,
                    "cpus": len(os.sched_getaffinity(0)), "methods": {}}
    for method in args.methods:
        cfg_path = root / f"bench-merge-{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(CONFIGS[method](ckpt_dir)))
        in_bytes = report["input_bytes"]
        sm = [str(bin_dir / "simmerge"), "merge", str(cfg_path), "--out", str(out), "--quiet"]
        rows: dict[str, dict] = {}
        print(f"[{method}] I/O floor ...", flush=True)
        floor_run = measure([sys.executable, "-m", "benchmarks.io_floor", "--out-bytes", str(out_bytes),
                             "--out", str(out), *map(str, files)])
        # the floor's own I/O time, without its interpreter's start-up
        floor_run["seconds"] = json.loads(floor_run["output"].splitlines()[0])["seconds"]
        rows["I/O floor (read inputs once, write output once)"] = floor_run
        print(f"[{method}] simmerge merge (default: threads here) ...", flush=True)
        rows["simmerge merge (default)"] = measure(sm)
        print(f"[{method}] mergekit-yaml ...", flush=True)
        rows["mergekit-yaml"] = measure([str(bin_dir / "mergekit-yaml"), str(cfg_path), str(out), "--no-copy-tokenizer"])
        if not args.skip_cluster:
            with ray_head(bin_dir / "ray", env, num_cpus=len(os.sched_getaffinity(0))) as (address, group):
                print(f"[{method}] simmerge merge --address (Ray cluster, 2 actors) ...", flush=True)
                rows["simmerge merge --address (Ray, 2 actors)"] = measure(sm + ["--address", address, "--workers", "2"], group)
        floor, mk = rows["I/O floor (read inputs once, write output once)"], rows["mergekit-yaml"]
        for label, r in rows.items():
            # simmerge's own merge time (without the interpreter's start-up and torch's import)
            found = re.search(r"wrote .* in ([0-9.]+) s", r["output"]) if label.startswith("simmerge") else None
            if found:
                r["merge_seconds"] = float(found.group(1))
                r["per_worker_input_gbps"] = in_bytes / 1e9 / r["merge_seconds"] / _workers(r["output"])
            r.pop("output", None)
            r["input_gbps"] = in_bytes / 1e9 / r["seconds"]
            r["x_floor"] = r["seconds"] / floor["seconds"]
            r["speed_vs_mergekit"] = mk["seconds"] / r["seconds"]
            r["pss_vs_mergekit"] = r["peak_pss_gb"] / mk["peak_pss_gb"]
        report["methods"][method] = rows
    print(f"\n3 x {report['input_bytes'] / 3e9:.2f} GB bf16 llama checkpoints, {report['cpus']} CPUs, warm page cache")
    print(f"{'method':<8}{'run':<46}{'seconds':>9}{'x floor':>9}{'vs mergekit':>13}{'peak PSS GB':>13}{'PSS vs mk':>11}")
    for method, rows in report["methods"].items():
        for label, r in rows.items():
            print(f"{method:<8}{label:<46}{r['seconds']:>9.2f}{r['x_floor']:>9.2f}{r['speed_vs_mergekit']:>12.2f}x"
                  f"{r['peak_pss_gb']:>13.2f}{r['pss_vs_mergekit']:>10.2f}x")
    path = root / "bench_merge.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
