"""How far the planner's propagated features are from those of merges actually built (issue 7).

On a finished pipeline run (default: the demo's, runs/demo), samples expert/auxiliary pairs
(A, B), builds M = op(A, B) for every operator as a one-step plan through the merge engine (the
planner's step parameters), and measures
the real features of (M, C) on A's task for every other catalog model C with the project's own
commands (`simmerge features structural` and `features functional`, probe outputs of the
catalog's models reused from the run's cache). The planner's values for the same rows come from
the run's Gram matrices (exact for linear and SLERP, the linear formula as TIES's proxy) and the
mixture bounds of the pair features (functional features, sign agreement). Prints per operator
and feature family the Spearman rank correlation and the relative error; writes JSON.

    python -m benchmarks.proxy_accuracy --run runs/demo --out runs/proxy --pairs 8
    python -m benchmarks.proxy_accuracy --run runs/demo --out runs/proxy-anchor --weighting anchor

`--weighting` runs each one-step plan at that fold weighting's first share (half and equal:
1/2; anchor: 1/3 for the joining model), so weighted steps are measured too.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import polars as pl
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.merge.executor import ExecOptions
from simmerge_ray.features.structural import StructuralOptions
from simmerge_ray.pipeline import features as feature_stages
from simmerge_ray.pipeline.layout import RunLayout
from simmerge_ray.planner.execute import execute_plan
from simmerge_ray.merge.arms import STEP_ARMS, WEIGHTING_NAMES, get_weighting
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.propagate import (
    PROXY_PREFIXES, GramTable, PairLookup, initial_state, proxy_features, step_state, structural_features,
)
from benchmarks.proxy_stats import compare_columns, summarize_families
from simmerge_ray.features.schema import KEY_COLUMNS, feature_columns

HEADLINE = ("s_weight_cos", "s_tv_cos", "s_l2", "s_sign_agree", "f_kl_ab_mean", "f_kl_ba_mean",
            "f_act_cos_mean", "f_attn_cos_mean")


def sample_pairs(cat: Catalog, n: int, seed: int) -> list[tuple[str, str, str]]:
    """(expert A, auxiliary B of another task, A's task), distinct, seeded."""
    rng = random.Random(seed)
    pairs = [(a.name, b.name, a.task) for a in cat.models for b in cat.models if a.task and b.task and a.task != b.task]
    return rng.sample(pairs, min(n, len(pairs)))


def build_merge(plan: Plan, cat: Catalog, out: Path) -> None:
    """M = op(A, B) as the planner would execute it: a one-step plan through the merge engine
    (in this process: the merges are tiny), at the plan's step share."""
    execute_plan(plan, cat, out, ExecOptions(overwrite=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a finished pipeline run (zoo/, features/)")
    ap.add_argument("--out", default="runs/proxy")
    ap.add_argument("--pairs", type=int, default=8, help="sampled (A, B) pairs; each is merged with every operator")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weighting", default="half", choices=list(WEIGHTING_NAMES),
                    help="fold weighting whose first step share the merges use (anchor: 1/3)")
    args = ap.parse_args()
    run, out = RunLayout(Path(args.run).resolve()), Path(args.out).resolve()
    cat = Catalog.load(run.catalog)
    ops = list(STEP_ARMS)
    pairs = sample_pairs(cat, args.pairs, args.seed)
    t0 = time.perf_counter()

    # 1. Build the merges and a catalog holding them next to the original models.
    merges: list[tuple[str, str, str, str, str]] = []  # (name, a, b, op, task)
    for a, b, task in pairs:
        for op in ops:
            name = f"{op}-{args.weighting}-{a}-{b}"
            path = out / "merges" / name
            if not (path / "model.safetensors").exists():
                build_merge(Plan(task, [a, b], [op], weighting=args.weighting), cat, path)
            merges.append((name, a, b, op, task))
    catalog = {
        "base": str(cat.base),
        "models": [{"name": m.name, "path": str(m.path), "task": m.task} for m in cat.models]
        + [{"name": n, "path": str(out / "merges" / n)} for n, *_ in merges],
        "tasks": {t: {k: str(v) for k, v in e.model_dump().items() if v is not None} for t, e in cat.tasks.items()},
    }
    atomic_write_text(out / "catalog.yaml", yaml.safe_dump(catalog, sort_keys=False))
    built_s = time.perf_counter() - t0

    # 2. Their actual features, with the same commands (zoo models' probe outputs come from the run's cache).
    feats = out / "features"
    feature_stages.structural(out / "catalog.yaml", feats, StructuralOptions(overwrite=True))
    feature_stages.functional(feature_stages.ProbeRequest(out / "catalog.yaml", feats, feature_stages.run_options(),
                                                          cache=run.features / "probe_cache"))
    actual_table = pl.read_parquet(feats / "features.parquet")
    measured_s = time.perf_counter() - t0 - built_s

    # 3. The planner's values for the same (M, C, task) rows, from the run's own features.
    run_table = pl.read_parquet(run.feature_table)
    columns = [c for c in sorted(feature_columns(run_table)) if c in actual_table.columns]
    grams = GramTable.load(run.features)
    proxy_cols = [c for c in columns if c.startswith(PROXY_PREFIXES)]
    lookup = PairLookup(run_table, proxy_cols)
    index = {k: i for i, k in enumerate(actual_table.select(KEY_COLUMNS).rows())}
    actual_x = actual_table.select(columns).to_numpy().astype(np.float64)
    rows: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {op: ([], []) for op in ops}
    for name, a, b, op, task in merges:
        others = [m.name for m in cat.models if m.name not in (a, b)]
        arm = Plan(task, [a, b], [op], weighting=args.weighting).step_arms()[0]
        states = [step_state(grams, initial_state(grams, a), b, arm)] * len(others)
        exact = structural_features(grams, states, others)
        proxy = proxy_features(lookup, states, others, task)
        pred = np.column_stack([proxy[:, proxy_cols.index(c)] if c in proxy_cols else exact[c] for c in columns])
        rows[op][0].append(pred)
        rows[op][1].append(actual_x[[index[(name, c, task)] for c in others]])

    report = {"run": str(run.root), "pairs": [list(p) for p in pairs], "operators": ops,
              "weighting": args.weighting, "share": get_weighting(args.weighting).share(1),
              "seconds": {"build": built_s, "measure": measured_s}, "by_operator": {}}
    for op, (pred, act) in rows.items():
        per_col = compare_columns(np.vstack(pred), np.vstack(act), columns)
        report["by_operator"][op] = {"rows": int(sum(len(p) for p in pred)), "families": summarize_families(per_col),
                                     "columns": per_col}
    atomic_write_text(out / "proxy_accuracy.json", json.dumps(report, indent=2))
    print_report(report)
    print(f"\nwrote {out / 'proxy_accuracy.json'}")


def print_report(report: dict) -> None:
    print(f"\npropagated vs actual features of built merges (M = op(A, B) at share {report.get('share', 0.5):.3g}, C): "
          f"{len(report['pairs'])} pairs x {len(report['operators'])} operators")
    print(f"{'operator':<9}{'family':<30}{'cols':>5}{'Spearman med':>14}{'min':>7}{'rel err med':>13}")
    for op, r in report["by_operator"].items():
        for fam, v in r["families"].items():
            print(f"{op:<9}{fam:<30}{v['columns']:>5}{v['spearman_median']:>14.3f}{v['spearman_min']:>7.2f}"
                  f"{v['rel_mae_median']:>13.3g}")
    print(f"\n{'operator':<9}" + "".join(f"{c:>17}" for c in HEADLINE) + "   (Spearman)")
    for op, r in report["by_operator"].items():
        print(f"{op:<9}" + "".join(f"{r['columns'][c]['spearman']:>17.3f}" if c in r["columns"] else f"{'-':>17}"
                                   for c in HEADLINE))


if __name__ == "__main__":
    main()
