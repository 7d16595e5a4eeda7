"""The 111B-scale path: real Command-A (cohere2) tensor shapes, a reduced number of layers.

Builds three synthetic cohere2 checkpoints with the 111B model's true widths (hidden 12288,
MLP 36864, vocabulary 256000, 96 heads, 8 KV heads; bf16, 2 GB shards) and --layers blocks,
then runs the structural feature pass over them, a 3-way linear merge and a TIES merge (the
first model as base, every large tensor streamed in three passes), sampling the peak
memory (PSS) of each run's whole process tree. From the measured throughput it derives the
cost of the same work on full 111B checkpoints on W workers. Prints a table, writes JSON.

    python -m benchmarks.scale_111b --layers 1 --out runs/scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

from benchmarks.measure import timed

FULL = {"hidden": 12288, "intermediate": 36864, "vocab": 256000, "heads": 96, "kv_heads": 8, "layers": 64}


def full_params() -> int:
    """Parameters of the full 111B model (tied embeddings, as cohere2 ships)."""
    h, i, v, kv = FULL["hidden"], FULL["intermediate"], FULL["vocab"], FULL["kv_heads"]
    head_dim = h // FULL["heads"]
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i + h  # q, o, k, v, mlp, norm
    return v * h + FULL["layers"] * per_layer + h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (several GB each)")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    spec = SyntheticSpec(architecture="cohere2", hidden_size=FULL["hidden"], num_layers=args.layers,
                         num_heads=FULL["heads"], num_kv_heads=FULL["kv_heads"],
                         intermediate_size=FULL["intermediate"], vocab_size=FULL["vocab"],
                         tie_word_embeddings=True, dtype="bfloat16", max_shard_bytes=2 * 1024**3)
    names = ["m1", "m2", "m3"]
    ckpts = root / "ckpts"
    for i, n in enumerate(names):
        if not (ckpts / n / "config.json").exists():
            print(f"generating {ckpts / n} ...", flush=True)
            make_checkpoint(ckpts / n, SyntheticSpec(**{**spec.__dict__, "seed": i}), overwrite=True)
    size = Checkpoint.open(ckpts / "m1").nbytes
    biggest = max(e.nbytes for e in Checkpoint.open(ckpts / "m1").entries.values())
    (root / "catalog.yaml").write_text(yaml.safe_dump(
        {"models": [{"name": n, "path": str(ckpts / n)} for n in names]}))
    (root / "merge.yaml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "dtype": "bfloat16",
         "models": [{"model": str(ckpts / n), "parameters": {"weight": 1.0}} for n in names]}))
    # TIES with m1 as the base: every large tensor, the 6.29 GB embedding included, is streamed
    # (two passes for the magnitude thresholds, one to merge).
    (root / "ties.yaml").write_text(yaml.safe_dump(
        {"merge_method": "ties", "base_model": str(ckpts / names[0]), "dtype": "bfloat16",
         "models": [{"model": str(ckpts / n), "parameters": {"weight": 0.5, "density": 0.3}} for n in names[1:]]}))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
    bin_dir = Path(sys.executable).parent
    runs = {
        "structural features": [str(bin_dir / "simmerge"), "features", "structural", "--catalog",
                                str(root / "catalog.yaml"), "--out", str(root / "features"), "--overwrite",
                                "--no-cache", "--workers", str(args.workers)],
        "3-way linear merge": [str(bin_dir / "simmerge"), "merge", str(root / "merge.yaml"), "--out",
                               str(root / "merged"), "--overwrite", "--workers", str(args.workers)],
        "3-way TIES merge": [str(bin_dir / "simmerge"), "merge", str(root / "ties.yaml"), "--out",
                             str(root / "merged"), "--overwrite", "--workers", str(args.workers)],
    }
    results = {}
    for label, cmd in runs.items():
        print(f"running {label} ...", flush=True)
        r = timed(cmd, env)
        shutil.rmtree(root / "merged", ignore_errors=True)  # the disk holds one merged model at a time
        r.pop("output")
        r["input_gb"] = 3 * size / 1e9
        r["gbps"] = r["input_gb"] / r["seconds"]
        results[label] = r
    if not args.keep:
        shutil.rmtree(ckpts, ignore_errors=True)

    full_bytes = 2 * full_params()
    per_worker = {k: v["gbps"] / args.workers for k, v in results.items()}
    cost = {}
    for w in (1, 8, 32, 128):
        cost[w] = {
            "features_minutes_per_model": full_bytes / 1e9 / (per_worker["structural features"] * w) / 60,
            "merge3_minutes": 3 * full_bytes / 1e9 / (per_worker["3-way linear merge"] * w) / 60,
            "ties3_minutes": 3 * full_bytes / 1e9 / (per_worker["3-way TIES merge"] * w) / 60,
        }
    print(f"\ncohere2 shapes, {args.layers} layer(s): {size / 1e9:.2f} GB per checkpoint (bf16), largest tensor "
          f"{biggest / 1e9:.2f} GB; {args.workers} workers on {os.cpu_count()} CPUs")
    print(f"{'run':<22}{'seconds':>9}{'input GB':>10}{'GB/s':>8}{'peak PSS GB':>13}{'PSS / checkpoint':>18}")
    for label, r in results.items():
        print(f"{label:<22}{r['seconds']:>9.1f}{r['input_gb']:>10.2f}{r['gbps']:>8.3f}{r['peak_pss_gb']:>13.2f}"
              f"{r['peak_pss_gb'] / (size / 1e9):>17.2f}x")
    print(f"\nfull model: {full_params() / 1e9:.1f}B parameters, {full_bytes / 1e9:.0f} GB bf16; at the measured "
          f"per-worker rates:")
    print(f"{'workers':>8}{'features min/model':>20}{'3-way merge min':>17}{'3-way TIES min':>16}")
    for w, c in cost.items():
        print(f"{w:>8}{c['features_minutes_per_model']:>20.1f}{c['merge3_minutes']:>17.1f}{c['ties3_minutes']:>16.1f}")
    report = {"layers": args.layers, "checkpoint_bytes": size, "largest_tensor_bytes": biggest,
              "workers": args.workers, "results": results, "full_params": full_params(),
              "full_bytes": full_bytes, "per_worker_gbps": per_worker, "cost_model": cost}
    (root / "scale.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {root / 'scale.json'}")


if __name__ == "__main__":
    main()
