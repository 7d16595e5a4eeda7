"""Do the planner's later steps ask the selector about inputs it was trained on? (issue 7)

For every labelled 3- and 4-way plan of a finished pipeline run (default: runs/demo), walks
the plan's steps with the planner's step model and standardises each step's features with the
selector's own training statistics. It then reports, per step index, how far the step inputs
sit from the pairwise training rows: the median over steps of the largest |z| across features,
and the share of steps whose largest |z| exceeds the 99th percentile of the training rows' own.
Step 1 merges two catalog models, exactly like a training row; steps 2 and 3 start from an
intermediate merge. It also reports how well the planner's score ranks the measured expert
retention of the plans of each (task, subset): the mean Spearman correlation over subsets.
Prints a table, writes JSON.

    python -m benchmarks.planner_coverage --run runs/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import polars as pl

from simmerge_ray.catalog import Catalog
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.planner.evaluate import PlanScorer
from simmerge_ray.planner.plan import Plan
from benchmarks.proxy_stats import spearman
from simmerge_ray.planner.request import build_step_model
from simmerge_ray.selector.data import load_pair_data


def max_abs_z(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per row, the largest |standardised value| over features (undefined features ignored)."""
    z = np.abs((x - mean) / scale)
    return np.nanmax(np.where(np.isfinite(z), z, np.nan), axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished pipeline run (selector/, features/, labels/)")
    args = ap.parse_args()
    run = RunLayout(Path(args.run).resolve())
    model = build_step_model(run.selector, run.features, run.aux_selector if run.aux_selector.exists() else None)
    sel = model.selector
    cols = [model.names.index(n) for n in sel.feature_names]
    train = load_pair_data(run.features, run.pair_labels).select_features(sel.feature_names)
    train_z = max_abs_z(train.x, sel.mean, sel.scale)
    cut = float(np.nanpercentile(train_z, 99))

    labels = pl.read_parquet(run.multiway_labels)
    plans = labels.select(["task", "models", "operators", "weighting"]).rows()
    seen: set[tuple] = set()
    per_step: dict[int, list[float]] = {}
    for task, models, ops, weighting in plans:
        arms = Plan(task, models, ops, weighting=weighting).step_arms()
        state = model.start(models[0])
        for j, (nxt, arm) in enumerate(zip(models[1:], arms), start=1):
            key = (task, tuple(models[:j + 1]), tuple(a.name for a in arms[:j - 1]))  # prefix and next model
            if key not in seen:
                seen.add(key)
                x = model.features([state], [nxt], task)[:, cols]
                per_step.setdefault(j, []).append(float(max_abs_z(x, sel.mean, sel.scale)[0]))
            state = model.extend(state, nxt, arm)

    # Within each labelled (task, subset): predicted score against measured retention of the
    # first model (the expert of `task`).
    scorer = PlanScorer(model, Catalog.load(run.catalog).model_tasks)
    groups: dict[tuple, list[tuple]] = {}
    for task, models, ops, weighting, k, ret in labels.select(
            ["task", "models", "operators", "weighting", "k", "expert_retention"]).rows():
        # the first model is `task`'s only expert in the subset (its models have distinct tasks)
        groups.setdefault((k, task, tuple(sorted(models)), models[0]), []).append((models, ops, weighting, ret))
    rank: dict[str, list[float]] = {}
    for (k, _, _, expert), plans in groups.items():
        predicted = scorer.score_many([(m, o, w) for m, o, w, _ in plans], expert)
        rho = spearman(np.array(predicted), np.array([r for *_, r in plans]))
        if rho == rho:
            rank.setdefault(f"{k}way", []).append(rho)

    report = {"run": str(run.root), "training_rows": len(train), "training_max_abs_z_p99": cut,
              "score_vs_retention_spearman": {k: {"groups": len(v), "mean": float(np.mean(v)),
                                                  "share_positive": float(np.mean(np.asarray(v) > 0))}
                                              for k, v in sorted(rank.items())},
              "training_max_abs_z_median": float(np.nanmedian(train_z)), "steps": {}}
    for j, vals in sorted(per_step.items()):
        v = np.asarray(vals)
        report["steps"][str(j)] = {"inputs": len(v), "max_abs_z_median": float(np.median(v)),
                                   "share_beyond_training_p99": float((v > cut).mean())}
    atomic_write_text(run.multiway / "planner_coverage.json", json.dumps(report, indent=2))
    print(f"\nselector training rows: {len(train)}; their largest |z| per row: median "
          f"{report['training_max_abs_z_median']:.2f}, 99th percentile {cut:.2f}")
    print(f"{'step':>5}{'distinct inputs':>17}{'median largest |z|':>20}{'share beyond training p99':>28}")
    for j, r in report["steps"].items():
        print(f"{j:>5}{r['inputs']:>17}{r['max_abs_z_median']:>20.2f}{100 * r['share_beyond_training_p99']:>27.1f}%")
    for k, r in report["score_vs_retention_spearman"].items():
        print(f"{k}: planner score vs measured retention within a subset: mean Spearman {r['mean']:+.3f} "
              f"over {r['groups']} (task, subset) groups, positive in {100 * r['share_positive']:.0f}%")
    print(f"\nwrote {run.multiway / 'planner_coverage.json'}")


if __name__ == "__main__":
    main()
