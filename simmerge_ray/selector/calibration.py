"""Split-conformal prediction intervals for the selector's predicted utilities (pure numpy).

The residuals come from out-of-fold predictions on pairs the predicting model never saw (folds
by unordered model pair), so their spread is what a new pair's error looks like. A quantile is
kept per arm, not pooled: every arm has one residual per labelled pair, and on the demo labels
the arms' 90% half-widths range from 0.14 to 0.26, so one pooled width covered single arms from
87% to 99% at nominal 90% (docs/uncertainty.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from simmerge_ray.errors import ConfigError

LEVELS: tuple[float, ...] = (0.8, 0.9)  # nominal coverages stored and reported


def level_key(level: float) -> str:
    """'80' for 0.8: the JSON key of a level."""
    return f"{round(100 * level):d}"


def conformal_quantile(abs_residuals: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)-th smallest of n absolute residuals: the finite-sample split-conformal
    half-width, covering a new exchangeable residual with probability >= level. Infinite when
    n is too small for that rank (n < level / (1 - level)); NaN residuals are ignored."""
    if not 0 < level < 1:
        raise ValueError(f"level {level} is not in (0, 1)")
    r = np.sort(np.asarray(abs_residuals, dtype=np.float64)[~np.isnan(abs_residuals)])
    rank = math.ceil((len(r) + 1) * level - 1e-9)  # the tolerance keeps 10 * 0.9 at rank 9
    return float(r[rank - 1]) if rank <= len(r) else math.inf


@dataclass(frozen=True)
class Calibration:
    """Half-width per (level, arm): prediction +- half-width is the arm's interval."""

    operators: list[str]
    levels: tuple[float, ...]
    halfwidth: np.ndarray  # [len(levels), len(operators)], inf where n is too small
    rows: int  # calibration rows (labelled pairs) per arm
    folds: int  # out-of-fold folds the residuals came from

    def intervals(self, pred: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per level key: (lower, upper), each shaped like `pred` ([n, arms])."""
        return {level_key(lv): (pred - self.halfwidth[i], pred + self.halfwidth[i])
                for i, lv in enumerate(self.levels)}

    def to_dict(self) -> dict[str, Any]:
        return {"method": "split-conformal on out-of-fold absolute residuals, folds by unordered model pair",
                "scope": "per arm", "rows": self.rows, "folds": self.folds,
                "halfwidth": {level_key(lv): {op: (None if math.isinf(h) else h)
                                              for op, h in zip(self.operators, self.halfwidth[i].tolist())}
                              for i, lv in enumerate(self.levels)}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], operators: list[str], where: str) -> "Calibration":
        """Inverse of to_dict; `where` names the file in errors (None half-widths: unbounded)."""
        try:
            widths = raw["halfwidth"]
            levels = tuple(int(k) / 100 for k in widths)
            hw = np.array([[math.inf if widths[level_key(lv)][op] is None else float(widths[level_key(lv)][op])
                            for op in operators] for lv in levels])
            return cls(list(operators), levels, hw, int(raw["rows"]), int(raw["folds"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: calibration: malformed ({type(e).__name__}: {e})") from None


def calibrate(y: np.ndarray, pred: np.ndarray, operators: list[str], folds: int,
              levels: tuple[float, ...] = LEVELS) -> Calibration:
    """Per-arm conformal half-widths from labels `y` and out-of-fold predictions `pred` ([n, arms])."""
    res = np.abs(np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64))
    hw = np.array([[conformal_quantile(res[:, j], lv) for j in range(res.shape[1])] for lv in levels])
    return Calibration(list(operators), tuple(levels), hw, int(res.shape[0]), folds)


def coverage(y: np.ndarray, pred: np.ndarray, halfwidth: np.ndarray, levels: tuple[float, ...] = LEVELS
             ) -> dict[str, dict[str, float]]:
    """Empirical coverage of held-out intervals, per level key: over every (pair, arm) cell, over
    the arm each row's argmax picks (the interval `plan` shows first, subject to the winner's
    curse), and the mean interval width. `halfwidth` is [n, len(levels), arms]: row i's widths
    come from a calibration that never saw row i."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    rows = np.arange(len(y))
    pick = pred.argmax(axis=1)
    out = {}
    for i, lv in enumerate(levels):
        hw = halfwidth[:, i, :]
        inside = np.abs(y - pred) <= hw
        finite = np.isfinite(hw)
        out[level_key(lv)] = {
            "nominal": lv,
            "all_arms": float(inside.mean()),
            "picked_arm": float(inside[rows, pick].mean()),
            "mean_width": float((2 * hw).mean()) if finite.all() else None,  # None: some unbounded
        }
    return out
