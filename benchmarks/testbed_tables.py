"""Markdown tables of a demo run's testbed: the score matrix, label counts, and per-domain
GapClosed of each fixed operator and of the oracle (the table the selector must beat).

    python -m benchmarks.testbed_tables runs/demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from simmerge_ray.pipeline.layout import RunLayout


def main() -> None:
    run = RunLayout(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
    scores = pl.read_parquet(run.zoo / "scores.parquet")
    tasks = sorted(scores["task"].unique().to_list())
    wide = scores.pivot(on="task", index=["model", "model_task"], values="score").sort(
        ["model_task", "model"], nulls_last=False)
    print("Score (mean per-token probability of the reference answer) of every model on every domain:\n")
    print("| model | expert of | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---:|" * len(tasks))
    for row in wide.iter_rows(named=True):
        print(f"| {row['model']} | {row['model_task'] or '-'} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    pair = pl.read_parquet(run.pair_labels)
    multi = pl.read_parquet(run.multiway_labels)
    counts = multi.group_by("k").len().sort("k")
    print(f"\nLabels: {pair.height} two-way merges ({pair.select(['task', 'expert', 'aux']).unique().height} "
          f"expert-auxiliary pairs x {pair['operator'].n_unique()} operators); "
          + ", ".join(f"{n} {k}-way" for k, n in counts.filter(pl.col('k') >= 3).rows()) + ".\n")
    clipped = pair.with_columns(pl.col("gap_closed").clip(-2, 2))
    per = clipped.group_by(["task", "operator"]).agg(pl.col("gap_closed").mean())
    oracle = clipped.group_by(["task", "expert", "aux"]).agg(pl.col("gap_closed").max()).group_by("task").agg(
        pl.col("gap_closed").mean()).with_columns(pl.lit("oracle").alias("operator"))
    table = pl.concat([per, oracle.select(per.columns)]).pivot(on="task", index="operator", values="gap_closed")
    best = clipped.sort("gap_closed", descending=True).unique(["task", "expert", "aux"], keep="first")
    share = best.group_by("operator").len()
    print("GapClosed (%) per domain, all pairs (clipped to [-200, 200] %):\n")
    print("| operator | " + " | ".join(tasks) + " | mean | best on pairs |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    for row in table.sort("operator").iter_rows(named=True):
        n = share.filter(pl.col("operator") == row["operator"])["len"]
        wins = f"{int(n[0])}" if len(n) else ("-" if row["operator"] == "oracle" else "0")
        vals = [row[t] for t in tasks]
        print(f"| {row['operator']} | " + " | ".join(f"{100 * v:.1f}" for v in vals)
              + f" | {100 * sum(vals) / len(vals):.1f} | {wins} |")


if __name__ == "__main__":
    main()
