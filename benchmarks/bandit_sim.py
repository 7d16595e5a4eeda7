"""Benchmark: the replay simulator behind `simmerge bandit-sim` (both replays, every policy).

Times `replay_adding` (what `bandit-sim` runs: every operator from the start, then the most often
best one added at round `--add-at`) on labels and features you give, or on a synthetic problem
as wide as the tiny zoo's feature table (88 usable columns) when you give none. Each trial runs
the whole thing; the table gives the fastest and the median trial, the share of the warm start
(empirical-Bayes fit of the variances, once per replay) and the cost per bandit decision (the
whole run over its 2 replays x repeats x rounds x 2 bandit decisions). A checksum of the regret
summary is printed so that two runs (e.g. before and after a change) can be seen to agree.

    python -m benchmarks.bandit_sim --out runs/bench_bandit_sim.json
    python -m benchmarks.bandit_sim --labels labels/labels.parquet --features feats/ --trials 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import simmerge_ray.bandit.simulate as sim
from simmerge_ray.bandit.initial import usable_feature_columns
from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables
from simmerge_ray.features.schema import read_feature_table
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.tables import read_labels
from simmerge_ray.selector.data import features_file


def _data(args: argparse.Namespace) -> tuple[sim.ReplayData, sim.ReplayData, str]:
    if args.labels is not None:
        labels = read_labels(args.labels)
        features = read_feature_table(features_file(args.features))
        source = f"{args.labels} + {args.features}"
    else:
        labels, features = synthetic_tables(SyntheticBanditSpec(n_features=args.n_features, n_models=args.n_models))
        source = f"synthetic ({args.n_models} models, {args.n_features} features)"
    names, _ = usable_feature_columns(features, source)
    train, test = sim.split_by_pair(sim.replay_data(labels, features, names, source=source), args.test_frac, args.seed)
    return train, test, source


def _trial(train: sim.ReplayData, test: sim.ReplayData, settings: sim.SimSettings, add_at: int) -> dict:
    warm_s = 0.0
    original = sim.warm_bandit

    def timed_warm(*a, **k):  # the warm start's share (its evidence fit over the variance grid)
        nonlocal warm_s
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            warm_s += time.perf_counter() - t0

    sim.warm_bandit = timed_warm
    try:
        t0 = time.perf_counter()
        every, added = sim.replay_adding(train, test, settings, add_at=add_at)
        total = time.perf_counter() - t0
    finally:
        sim.warm_bandit = original
    digest = hashlib.sha256(json.dumps([every, added], sort_keys=True).encode()).hexdigest()[:16]
    return {"total_s": total, "warm_start_s": warm_s, "summary_sha256_16": digest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, help="labels.parquet (default: a synthetic problem)")
    p.add_argument("--features", type=Path, help="features folder or features.parquet (with --labels)")
    p.add_argument("--n-features", type=int, default=88, help="synthetic: feature columns (tiny zoo: 88)")
    p.add_argument("--n-models", type=int, default=6, help="synthetic: models (tiny zoo: 6 experts)")
    p.add_argument("--rounds", type=int, default=200, help="bandit-sim's default: 200")
    p.add_argument("--repeats", type=int, default=20, help="bandit-sim's default: 20")
    p.add_argument("--add-at", type=int, default=60)
    p.add_argument("--test-frac", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=3, help="whole runs timed")
    p.add_argument("--out", type=Path, default=Path("runs/bench_bandit_sim.json"), help="JSON written here")
    args = p.parse_args(argv)
    if (args.labels is None) != (args.features is None):
        p.error("--labels and --features go together")

    train, test, source = _data(args)
    settings = sim.SimSettings(rounds=args.rounds, repeats=args.repeats, seed=args.seed)
    trials = [_trial(train, test, settings, args.add_at) for _ in range(args.trials)]
    if len({t["summary_sha256_16"] for t in trials}) != 1:
        raise SystemExit("the trials' results differ: the simulator is not deterministic at a fixed seed")
    decisions = 2 * args.repeats * args.rounds * 2
    totals = [t["total_s"] for t in trials]
    result = {
        "source": source,
        "train_contexts": len(train.keys),
        "test_contexts": len(test.keys),
        "feature_width": len(train.feature_names),
        "operators": len(train.operators),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "trials": trials,
        "best_s": min(totals),
        "median_s": statistics.median(totals),
        "warm_start_s_median": statistics.median(t["warm_start_s"] for t in trials),
        "us_per_bandit_decision": 1e6 * min(totals) / decisions,
        "summary_sha256_16": trials[0]["summary_sha256_16"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "numpy": np.__version__},
    }
    print(f"bandit-sim replay: {source}; {result['train_contexts']} train / {result['test_contexts']} test "
          f"contexts, width {result['feature_width']}, {result['operators']} operators, "
          f"{args.rounds} rounds x {args.repeats} repeats x 2 replays")
    print(f"  {'trial':<8}{'total s':>10}{'warm start s':>15}")
    for i, t in enumerate(trials):
        print(f"  {i + 1:<8}{t['total_s']:>10.2f}{t['warm_start_s']:>15.2f}")
    print(f"  best {result['best_s']:.2f} s, median {result['median_s']:.2f} s; "
          f"{result['us_per_bandit_decision']:.0f} us per bandit decision (the whole run over its "
          f"{decisions} bandit decisions); "
          f"summary checksum {result['summary_sha256_16']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
