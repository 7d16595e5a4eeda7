"""All-at-once k-way merges against the labelled folds of the same models (issue 18).

A fold merges k models two at a time; task arithmetic, TIES, DARE-TIES and multi-SLERP can take
all k at once. For every 3- and 4-way subset the label run measured (labels_multiway.parquet of a
finished pipeline run), this merges the subset's models with each all-at-once variant, scores
the result on every model's own task with the label run's evaluator, and compares the mean
retention (mean over the subset's models of the change of each one's accuracy on its task) with
the labelled folds of the same subset: the best one, their mean, and the model soup (the equal
linear mean, which every fold of linear steps under the `equal` weighting is). Prints a table,
writes JSON.

    python -m benchmarks.kway_merges --run runs/demo --out runs/kway
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.testbed.labels import PlanEvaluator
from simmerge_ray.testbed.merging import merge_state_dicts

# (method, global parameters, per-model parameters): each per-model value is given to every model.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "soup": ("linear", {"normalize": True}, {"weight": 1.0}),
    "ta_1.0": ("task_arithmetic", {"lambda": 1.0}, {"weight": 1.0}),
    "ta_0.7": ("task_arithmetic", {"lambda": 0.7}, {"weight": 1.0}),
    "ta_0.5": ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
    "ties_0.5": ("ties", {"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "ties_0.2": ("ties", {"normalize": True}, {"weight": 1.0, "density": 0.2}),
    "ties_0.5_sum": ("ties", {"normalize": False}, {"weight": 1.0, "density": 0.5}),
    "dare_ties_0.5": ("dare_ties", {"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "multislerp": ("multislerp", {}, {"weight": 1.0}),
}


def params_for(variant: str, k: int) -> tuple[str, dict]:
    method, glob, per = VARIANTS[variant]
    return method, {**glob, **{name: [value] * k for name, value in per.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished pipeline run (zoo/, labels/)")
    ap.add_argument("--out", default="runs/kway")
    args = ap.parse_args()
    run = RunLayout(Path(args.run).resolve())
    info = json.loads(run.label_summary.read_text())
    metric = info["metric"]  # model_scores.parquet and the labels hold this metric in their score columns
    singles = {(r["model"], r["task"]): r["score"] for r in pl.read_parquet(run.labels / "model_scores.parquet").to_dicts()}
    multi = pl.read_parquet(run.multiway_labels)
    t0 = time.perf_counter()
    ev = PlanEvaluator(str(run.catalog), threads=torch.get_num_threads())
    from simmerge_ray.testbed.evaluate import score

    rows = []
    subsets = multi.select("k", pl.col("models").list.sort().alias("subset")).unique().sort("k", "subset").to_dicts()
    for sub in subsets:
        models, k = sub["subset"], sub["k"]
        folds = multi.filter(pl.col("models").list.sort() == models)
        tasks = dict(zip(folds["models"][0], folds["model_tasks"][0]))
        fold_means = folds["mean_retention"].drop_nulls()
        row = {"k": k, "models": models, "best_fold": fold_means.max(), "mean_fold": fold_means.mean(),
               "equal_folds": folds.filter(pl.col("weighting") == "equal")["mean_retention"].mean()}
        for variant in VARIANTS:
            method, params = params_for(variant, k)
            merged = merge_state_dicts(method, [ev.states[m] for m in models], ev.states["base"], params)
            ev.model.load_state_dict(merged)
            kept = [score(ev.model, ev.evals[tasks[m]])[metric] / singles[(m, tasks[m])] - 1 for m in models]
            row[variant] = sum(kept) / k
        rows.append(row)
        print(f"{k}-way {', '.join(models)}: best fold {100 * row['best_fold']:.1f}, "
              + ", ".join(f"{v} {100 * row[v]:.1f}" for v in VARIANTS), flush=True)

    table = pl.DataFrame(rows)
    cols = ["best_fold", "mean_fold", "equal_folds", *VARIANTS]
    summary = {}
    print(f"\nmean retention (%), mean over subsets ({metric}); {time.perf_counter() - t0:.0f} s")
    print("| k | subsets | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for k in (3, 4):
        part = table.filter(pl.col("k") == k)
        if part.height == 0:
            continue
        means = {c: float(part[c].mean()) for c in cols}
        beats = {v: int((part[v] > part["best_fold"]).sum()) for v in VARIANTS}
        summary[f"{k}way"] = {"subsets": part.height, "mean_retention": means, "beats_best_fold": beats}
        print(f"| {k} | {part.height} | " + " | ".join(f"{100 * means[c]:.1f}" for c in cols) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kway_merges.json", json.dumps({"run": str(run.root), "metric": metric, "summary": summary,
                                                            "subsets": rows}, indent=1))


if __name__ == "__main__":
    main()
