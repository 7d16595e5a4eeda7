"""Benchmark: build a zoo and label it (the demo's testbed stage), with the time of each phase.

Prints the score matrix (models x domains), the phase timings (wall and, for training, the CPU
seconds of the training processes, which stay meaningful on a shared machine), the label counts
and the GapClosed table of each fixed operator and of the oracle; writes it all as JSON.

    python -m benchmarks.bench_testbed --config configs/zoo_default.yaml --out runs/testbed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import polars as pl

from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.ray_session import init_ray
from simmerge_ray.testbed.build import build_zoo
from simmerge_ray.testbed.label_plans import LabelSettings
from simmerge_ray.testbed.labels import run_labels
from simmerge_ray.testbed.zoo_config import ZooConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "zoo_default.yaml"))
    ap.add_argument("--out", default=str(REPO / "runs" / "testbed"))
    ap.add_argument("--reuse-zoo", action="store_true", help="label an existing zoo in OUT/zoo instead of building")
    args = ap.parse_args()
    out = Path(args.out)
    run = RunLayout(out)  # the pipeline's folders, so the demo's tools read this output too
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    cfg = ZooConfig.load(args.config)
    zoo = run.zoo
    t0 = time.perf_counter()
    if not args.reuse_zoo:
        build_zoo(cfg, zoo, overwrite=True)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = run_labels(run.catalog, run.labels, LabelSettings())
    label_s = time.perf_counter() - t1

    manifest = json.loads((zoo / "manifest.json").read_text())
    scores = pl.read_parquet(zoo / "scores.parquet").pivot(on="task", index="model", values="score")
    summary = json.loads(run.label_summary.read_text())
    gap = pl.read_parquet(run.labels / "gap_summary.parquet")
    cpu = sum(c for _, c in manifest["train_seconds"].values())
    pl.Config.set_tbl_rows(50)
    pl.Config.set_tbl_cols(20)
    pl.Config.set_float_precision(4)
    print(scores)
    t = manifest["timings"]
    base = f"{t['base_s']:.0f}s" + (f", trained in {t['base_when_cached_s']:.0f}s when cached" if "base_when_cached_s" in t else "")
    print(f"build: {build_s:.0f}s wall (base {base}, experts "
          f"{manifest['timings']['experts_wall_s']:.0f}s; training CPU total {cpu:.0f}s)")
    print(f"labels: {label_s:.0f}s wall, {report.computed} plans measured, {report.cached} cached; "
          f"2-way {summary['labels_2way']} (+{summary['dropped_2way_small_gap']} dropped), "
          f"3-way {summary['labels_3way']}, 4-way {summary['labels_4way']}")
    print(gap)
    result = {
        "config": args.config,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "build_wall_s": build_s,
        "label_wall_s": label_s,
        "training_cpu_s": cpu,
        "timings": manifest["timings"],
        "train_seconds": manifest["train_seconds"],
        "scores": scores.to_dicts(),
        "labels": {k: summary[k] for k in ("labels_2way", "dropped_2way_small_gap", "labels_3way", "labels_4way")},
        "gap_closed": gap.to_dicts(),
    }
    (out / "bench_testbed.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'bench_testbed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
