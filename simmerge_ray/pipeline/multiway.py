"""The multi-way stage: the planner scores the measured 3- and 4-way plans through merges it
never builds, and is judged against their measured outcomes; the calibration of its predictions
on those outcomes (planner/calibrate.py) is fitted and saved for `simmerge plan`."""

from __future__ import annotations

import json
from dataclasses import replace

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.pipeline.layout import RunLayout


def judge_multiway(run: RunLayout) -> dict:
    """multiway/multiway.json from the fitted selectors (the two-sided one and its auxiliary twin),
    the features and the multi-way labels."""
    import polars as pl

    from simmerge_ray.catalog import Catalog
    from simmerge_ray.planner.evaluate import PlanScorer, evaluate_multiway, fit_calibration, multiway_targets
    from simmerge_ray.planner.request import build_step_model
    from simmerge_ray.selector.encoder import selector_digest
    from simmerge_ray.selector.train import one_thread

    aux = run.aux_selector if run.aux_selector.exists() else None
    model = build_step_model(str(run.selector), str(run.features), None if aux is None else str(aux))
    labels = pl.read_parquet(run.multiway_labels)
    scorer = PlanScorer(model, Catalog.load(run.catalog).model_tasks)
    with one_thread():  # many small selector calls: fastest on one thread, and unharmed by a busy machine
        targets = multiway_targets(labels, scorer)
    result = evaluate_multiway(labels, scorer, targets)
    run.multiway.mkdir(exist_ok=True)
    atomic_write_text(run.multiway / "multiway.json", json.dumps(result, indent=2))
    fitted = replace(fit_calibration(targets, scorer.objective), selectors={
        "selector": selector_digest(run.selector), **({"aux_selector": selector_digest(aux)} if aux else {})})
    atomic_write_text(run.multiway_calibration, fitted.to_json())
    return result
