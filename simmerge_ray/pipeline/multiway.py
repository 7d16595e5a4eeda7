"""The multi-way stage: the planner scores the measured 3- and 4-way plans through merges it
never builds, and is judged against their measured outcomes; the calibration of its predictions
on those outcomes (planner/calibrate.py) is fitted and saved for `simmerge plan`. The pipeline runs
it on its testbed, `simmerge calibrate` on the labels of a user's catalog."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.pipeline.layout import RunLayout

if TYPE_CHECKING:
    import polars as pl

MULTIWAY_FILE, CALIBRATION_FILE = "multiway.json", "calibration.json"


def judge_multiway(run: RunLayout) -> dict:
    """multiway/multiway.json from the fitted selectors (the two-sided one and its auxiliary twin),
    the features and the multi-way labels."""
    import polars as pl

    from simmerge_ray.catalog import Catalog

    aux = run.aux_selector if run.aux_selector.exists() else None
    result, calibration = judge_and_calibrate(run.selector, aux, run.features, Catalog.load(run.catalog).model_tasks,
                                              pl.read_parquet(run.multiway_labels))
    run.multiway.mkdir(exist_ok=True)
    atomic_write_text(run.multiway / MULTIWAY_FILE, json.dumps(result, indent=2))
    atomic_write_text(run.multiway_calibration, calibration)
    return result


def judge_and_calibrate(selector: Path, aux: Path | None, features: Path, tasks: Mapping[str, str | None],
                        labels: pl.DataFrame) -> tuple[dict, str]:
    """(the planner judged on the measured multi-way merges `labels` of the models of `tasks`
    (name -> task), the calibration of its predictions on them as calibration.json's text,
    recording the selectors it maps)."""
    from simmerge_ray.planner.evaluate import PlanScorer, evaluate_multiway, fit_calibration, multiway_targets
    from simmerge_ray.planner.request import build_step_model
    from simmerge_ray.selector.encoder import selector_digest
    from simmerge_ray.selector.train import one_thread

    model = build_step_model(str(selector), str(features), None if aux is None else str(aux))
    scorer = PlanScorer(model, tasks)
    with one_thread():  # many small selector calls: fastest on one thread, and unharmed by a busy machine
        targets = multiway_targets(labels, scorer)
    result = evaluate_multiway(labels, scorer, targets)
    fitted = replace(fit_calibration(targets, scorer.objective), selectors={
        "selector": selector_digest(selector), **({"aux_selector": selector_digest(aux)} if aux else {})})
    return result, fitted.to_json()
