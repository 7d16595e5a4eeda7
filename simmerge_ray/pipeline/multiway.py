"""The multi-way stage: the planner scores the measured 3- and 4-way plans through merges it
never builds, and is judged against their measured outcomes."""

from __future__ import annotations

import json

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.pipeline.layout import RunLayout


def judge_multiway(run: RunLayout) -> dict:
    """multiway/multiway.json from the fitted selector, the features and the multi-way labels."""
    import polars as pl

    from simmerge_ray.planner.evaluate import PlanScorer, evaluate_multiway
    from simmerge_ray.planner.request import build_step_model

    model = build_step_model(str(run.selector), str(run.features))
    labels = pl.read_parquet(run.multiway_labels)
    result = evaluate_multiway(labels, PlanScorer(model))
    run.multiway.mkdir(exist_ok=True)
    atomic_write_text(run.multiway / "multiway.json", json.dumps(result, indent=2))
    return result
