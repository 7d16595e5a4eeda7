"""Turn measured plan scores into the label tables (schemas in docs/testbed.md) and their summary.

Pure functions over plain dicts and polars frames: no Ray, no files.
"""

from __future__ import annotations

import json

import polars as pl

from simmerge_ray.merge.arms import get_arm
from simmerge_ray.testbed.label_plans import LabelPlan

Scores = dict[str, float]  # task -> score


def gap_closed(s_merge: float, s_expert: float, s_aux: float) -> float:
    """METHOD.md: (s(merge) - s(aux)) / (s(expert) - s(aux)) on the expert's task."""
    return (s_merge - s_aux) / (s_expert - s_aux)


def two_sided_utility(gap: float, aux_gap: float | None) -> float | None:
    """METHOD.md: U = (GapClosed on the expert's task + GapClosed on the auxiliary's task) / 2;
    undefined (None) where the auxiliary side's gap is too small to measure."""
    return None if aux_gap is None else (gap + aux_gap) / 2


def model_scores_table(singles: dict[str, Scores]) -> pl.DataFrame:
    return pl.DataFrame(
        [{"model": m, "task": t, "score": s} for m, scores in singles.items() for t, s in scores.items()],
        schema={"model": pl.String, "task": pl.String, "score": pl.Float64},
    )


def pairwise_table(results: list[tuple[LabelPlan, Scores]], singles: dict[str, Scores],
                   experts: dict[str, str], epsilon: float) -> tuple[pl.DataFrame, int]:
    """labels.parquet rows, and how many (pair, operator) rows were dropped for a gap below epsilon."""
    rows, dropped = [], 0
    for plan, scores in results:
        a, b = plan.models
        t, u = experts[a], experts[b]
        s_e, s_a = singles[a][t], singles[b][t]
        if s_e - s_a < epsilon:
            dropped += 1
            continue
        s_ea, s_aa = singles[a][u], singles[b][u]
        op = plan.operators[0]
        arm = get_arm(op)
        gap = gap_closed(scores[t], s_e, s_a)
        aux_gap = (scores[u] - s_ea) / (s_aa - s_ea) if s_aa - s_ea >= epsilon else None
        rows.append({
            "task": t, "expert": a, "aux": b, "aux_task": u, "operator": op,
            "params": json.dumps({"method": arm.method, **arm.params}, sort_keys=True),
            "s_merge_task": scores[t], "s_merge_aux_task": scores[u],
            "s_expert_task": s_e, "s_aux_task": s_a, "s_expert_aux_task": s_ea, "s_aux_aux_task": s_aa,
            "gap_closed": gap, "aux_gap_closed": aux_gap, "utility": two_sided_utility(gap, aux_gap),
        })
    schema = {
        "task": pl.String, "expert": pl.String, "aux": pl.String, "aux_task": pl.String, "operator": pl.String,
        "params": pl.String, **{c: pl.Float64 for c in (
            "s_merge_task", "s_merge_aux_task", "s_expert_task", "s_aux_task", "s_expert_aux_task",
            "s_aux_aux_task", "gap_closed", "aux_gap_closed", "utility")},
    }
    return pl.DataFrame(rows, schema=schema), dropped


def multiway_table(results: list[tuple[LabelPlan, Scores]], singles: dict[str, Scores],
                   experts: dict[str, str]) -> pl.DataFrame:
    """labels_multiway.parquet: one row per plan, with every model's measured retention on its own
    task (s_merge / s_model - 1; undefined where the model scores 0 there, possible in accuracy on
    tiny zoos) and their mean; `task` and `expert_retention` are the first model's."""
    rows = []
    for plan, scores in results:
        retention = {m: (scores[experts[m]] / singles[m][experts[m]] - 1 if singles[m][experts[m]] > 0 else None)
                     for m in plan.models}
        defined = [r for r in retention.values() if r is not None]
        first = plan.models[0]
        t = experts[first]
        rows.append({
            "task": t, "models": list(plan.models), "operators": list(plan.operators), "k": plan.k,
            "weighting": plan.weighting, "model_tasks": [experts[m] for m in plan.models],
            "s_merge_task": scores[t], "s_expert_task": singles[first][t], "expert_retention": retention[first],
            "mean_retention": sum(defined) / len(defined) if defined else None,
            "retention": json.dumps(retention, sort_keys=True),
            "scores": json.dumps(scores, sort_keys=True),
        })
    schema = {"task": pl.String, "models": pl.List(pl.String), "operators": pl.List(pl.String), "k": pl.Int64,
              "weighting": pl.String, "model_tasks": pl.List(pl.String), "s_merge_task": pl.Float64,
              "s_expert_task": pl.Float64, "expert_retention": pl.Float64, "mean_retention": pl.Float64,
              "retention": pl.String, "scores": pl.String}
    return pl.DataFrame(rows, schema=schema)


def gap_summary(labels: pl.DataFrame, value: str = "utility") -> pl.DataFrame:
    """Per task (and 'mean' over tasks): mean `value` (the two-sided utility, or the one-sided
    gap_closed) of each arm and of the oracle (best arm per (expert, aux) pair), plus how often
    each arm is the best. Rows where `value` is undefined (a too small auxiliary gap) are left out."""
    ops = sorted(labels["operator"].unique().to_list())
    labels = labels.filter(pl.col(value).is_not_null())
    if labels.is_empty():  # no pair has a gap to close: a summary without rows
        return pl.DataFrame(schema={"task": pl.String, **{op: pl.Float64 for op in ops}, "oracle": pl.Float64,
                                    "pairs": pl.UInt32, **{f"best_{op}": pl.UInt32 for op in ops}})
    per_pair = labels.group_by("task", "expert", "aux").agg(
        pl.col(value).max().alias("oracle"),
        pl.col("operator").sort_by(value, descending=True).first().alias("best"),
    )
    fixed = labels.pivot(on="operator", index="task", values=value, aggregate_function="mean")
    oracle = per_pair.group_by("task").agg(pl.col("oracle").mean(), pl.len().alias("pairs"))
    wins = per_pair.pivot(on="best", index="task", values="expert", aggregate_function="len")
    wins = wins.rename({op: f"best_{op}" for op in ops if op in wins.columns})
    out = fixed.join(oracle, on="task").join(wins, on="task", how="left").sort("task")
    for op in ops:
        if f"best_{op}" not in out.columns:
            out = out.with_columns(pl.lit(0, dtype=pl.UInt32).alias(f"best_{op}"))
    out = out.with_columns(pl.col(f"best_{op}").fill_null(0) for op in ops)
    mean_row = out.select(
        pl.lit("mean").alias("task"),
        *(pl.col(op).mean() for op in ops),
        pl.col("oracle").mean(),
        pl.col("pairs").sum(),
        *(pl.col(f"best_{op}").sum() for op in ops),
    )
    return pl.concat([out.select(mean_row.columns), mean_row], how="vertical_relaxed")
