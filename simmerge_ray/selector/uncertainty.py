"""Calibrating a fitted selector's intervals and recording its training domain (at `fit`), and
measuring the intervals' coverage on held-out pairs (at `evaluate-selector`).

Calibration refits the selector with its chosen hyperparameters on K folds by model pair (no
search per fold) and keeps per-arm conformal quantiles of the out-of-fold absolute residuals.
The coverage measurement nests the same procedure inside each outer training part, so an outer
test pair influences neither its prediction nor its interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simmerge_ray.selector.calibration import LEVELS, Calibration, calibrate, coverage
from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.domain import training_domain
from simmerge_ray.selector.folds import Split, group_kfold
from simmerge_ray.selector.model import Selector
from simmerge_ray.selector.oof import FitFn, out_of_fold, per_split


def calibrate_out_of_fold(data: PairData, fit: FitFn, folds: int, seed: int = 0) -> Calibration | None:
    """Per-arm conformal half-widths from `folds` pair-grouped refits; None below 2 model pairs."""
    if len(set(data.pair_keys)) < 2:
        return None
    splits = group_kfold(data.pair_keys, folds, seed)
    pred, _ = out_of_fold(data, splits, fit)
    return calibrate(data.y, pred, data.operators, len(splits))


def add_uncertainty(sel: Selector, data: PairData, fit: FitFn, folds: int, seed: int = 0) -> None:
    """Attach the calibration (unless `folds` is 0) and the training domain of `data` to `sel`."""
    sel.calibration = calibrate_out_of_fold(data, fit, folds, seed) if folds > 0 else None
    sel.domain = training_domain(sel.standardise(data.x), sel.feature_names, data.same_task_pairs)


def held_out_coverage(data: PairData, splits: list[Split], pred: np.ndarray, fit: FitFn | Sequence[FitFn],
                      inner_folds: int, seed: int = 0) -> dict:
    """Coverage of the intervals on the outer test rows of `splits` (`pred`: their out-of-fold
    predictions), each row's half-widths calibrated on its outer training part alone (with that
    fold's fit, where `fit` is one per split)."""
    hw = np.full((len(data), len(LEVELS), len(data.operators)), np.inf)
    for (tr, te), fit_fold in zip(splits, per_split(fit, splits)):
        cal = calibrate_out_of_fold(data.subset(tr), fit_fold, inner_folds, seed)
        if cal is not None:
            hw[te] = cal.halfwidth
    return {"method": f"per-arm split-conformal, calibrated by {inner_folds}-fold out-of-fold residuals inside "
                      f"each outer training part (folds by unordered model pair)",
            "rows": len(data), "arms": len(data.operators), "levels": coverage(data.y, pred, hw)}
