"""Multi-way calibration: measured 3-/4-way merges correct the planner's predicted retentions.

The step model is fitted on pairwise labels. Propagated through a fold, its predicted retention
ranks the expert's measured retention but hardly the other models' (README, multi-way). The
labels also hold measured multi-way merges; a ridge regression fitted on them maps a plan's
predicted retentions and its shape to its measured expert retention and the measured mean
retention of the other models. Inputs:
  - the step model's predicted R of the expert and mean R of the others (objective.py);
  - the plan's shape: the expert's share of the final merge and the largest other share (each
    step's share multiplied out, as for a linear fold), the fractions of TIES and SLERP steps, a
    TIES first step, the weighting (equal, anchor; half is the baseline), the expert's position.
It is judged leave-one-subset-out (planner/evaluate.py): a subset's plans are chosen by a
calibrator that has never seen that subset's labels. Its intervals are split-conformal on those
leave-one-subset-out residuals: what a calibrator's error looks like on a subset it never saw (a
size labelled on few subsets joins the other sizes' residuals: evaluate.OWN_WIDTHS_MIN_SUBSETS).
The top plan gets more: it is picked because its calibrated score is the highest, so its
measured retention falls short of the prediction more often than a random plan's (the winner's
curse; on the demo's labels the pick's expert retention came 9-20 points below its prediction).
Its `top_plan` values are corrected by the median error of the calibrated picks on held-out
subsets and carry intervals from those picks' errors alone.
Pure numpy: no I/O, no Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.fold import Fold
from simmerge_ray.selector.calibration import LEVELS, conformal_quantile, level_key

FEATURES: tuple[str, ...] = ("pred_expert", "pred_others", "expert_share", "max_other_share", "ties_steps",
                             "slerp_steps", "ties_first", "weighting_equal", "weighting_anchor", "expert_position",
                             "intercept")
RIDGE = 1e-2


def final_shares(fold: Fold) -> dict[str, float]:
    """Each model's share of the fold's result, the step shares multiplied out (an arm without a
    share, run as declared, counts as an equal step)."""
    share = {fold.models[0]: 1.0}
    for arm, model in zip(fold.step_arms(), fold.models[1:]):
        w = arm.share if arm.share is not None else 0.5
        share = {m: v * (1 - w) for m, v in share.items()}
        share[model] = w
    return share


def plan_features(fold: Fold, expert: str, retention: Mapping[str, float | None]) -> list[float]:
    """One row of FEATURES for `fold` judged with `expert` as the expert; `retention` is the step
    model's predicted R per model (objective.py), None where it cannot say (counted as 0)."""
    share = final_shares(fold)
    steps = len(fold.operators)
    r_e = retention.get(expert)
    others = [r for m, r in retention.items() if m != expert and r is not None]
    return [
        0.0 if r_e is None else float(r_e),
        float(np.mean(others)) if others else 0.0,
        share[expert],
        max(v for m, v in share.items() if m != expert),
        fold.operators.count("ties") / steps,
        fold.operators.count("slerp") / steps,
        float(fold.operators[0] == "ties"),
        float(fold.weighting == "equal"),
        float(fold.weighting == "anchor"),
        fold.models.index(expert) / steps,
        1.0,
    ]


@dataclass(frozen=True)
class RetentionCalibrator:
    """Ridge coefficients: measured (expert retention, others' mean retention) = X @ coef."""

    coef: np.ndarray  # [len(FEATURES), 2]

    def __post_init__(self) -> None:
        shape = np.shape(self.coef)
        if shape != (len(FEATURES), 2):
            raise ValueError(f"coef has shape {list(shape)}, not [{len(FEATURES)}, 2]")
        if not np.all(np.isfinite(self.coef)):
            raise ValueError("coef holds a number that is not finite")

    @classmethod
    def fit(cls, x: Sequence[Sequence[float]], y: Sequence[Sequence[float]], ridge: float = RIDGE
            ) -> "RetentionCalibrator":
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if xa.ndim != 2 or xa.shape[1] != len(FEATURES) or ya.shape != (xa.shape[0], 2):
            raise ValueError(f"calibration rows: expected [n, {len(FEATURES)}] inputs and [n, 2] targets, "
                             f"got {xa.shape} and {ya.shape}")
        coef = np.linalg.solve(xa.T @ xa + ridge * np.eye(xa.shape[1]), xa.T @ ya)
        return cls(coef)

    def predict(self, x: Sequence[Sequence[float]]) -> np.ndarray:
        """[n, 2]: predicted expert retention and others' mean retention (s_merge / s_model - 1)."""
        return np.asarray(x, dtype=np.float64) @ self.coef

    def score(self, x: Sequence[Sequence[float]], retention_weight: float = 1.0, aux_weight: float = 1.0
              ) -> np.ndarray:
        """The objective's value on the calibrated retentions, one per row."""
        p = self.predict(x)
        return retention_weight * p[:, 0] + aux_weight * p[:, 1]


def halfwidths(abs_residuals: np.ndarray, levels: Sequence[float] = LEVELS) -> dict[str, list[float | None]]:
    """Per level key: the conformal half-width of the expert's and of the others' retention, from
    [n, 2] absolute residuals on held-out subsets (None: too few rows for that level)."""
    res = np.asarray(abs_residuals, dtype=np.float64)
    out = {}
    for lv in levels:
        hw = [conformal_quantile(res[:, j], lv) for j in range(2)]
        out[level_key(lv)] = [None if np.isinf(h) else h for h in hw]
    return out


def pick_correction(signed_residuals: np.ndarray, levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """From [n, 2] signed errors (measured - calibrated) of calibrated picks on held-out subsets:
    the median error of the expert's and of the others' retention (`bias`, added to a top plan's
    prediction) and the conformal half-widths of the errors around it (`halfwidth`)."""
    res = np.asarray(signed_residuals, dtype=np.float64).reshape(-1, 2)
    bias = [float(np.nanmedian(res[:, j])) if np.isfinite(res[:, j]).any() else 0.0 for j in range(2)]
    return {"targets": len(res), "bias": bias, "halfwidth": halfwidths(np.abs(res - np.array(bias)), levels)}


def _bands(hw: Mapping[str, Sequence[float | None]], expert: float, others: float) -> dict[str, dict[str, list]]:
    """Per level key: [low, high] of the expert's and the others' retention (None ends: unbounded)."""
    return {lv: {"expert_retention": [None, None] if he is None else [expert - he, expert + he],
                 "others_retention": [None, None] if ho is None else [others - ho, others + ho]}
            for lv, (he, ho) in hw.items()}


@dataclass(frozen=True)
class MultiwayCalibration:
    """A calibrator per plan size (3, 4, ...), fitted on every labelled subset of that size of a
    pipeline run (`OUT/multiway/calibration.json`); `simmerge plan --calibration` ranks plans of
    those sizes by it and shows each calibrated retention with its interval."""

    by_size: Mapping[int, RetentionCalibrator]
    subsets: Mapping[int, int]  # labelled subsets each calibrator was fitted on
    # per size, level key -> [expert, others] half-width (None: unbounded); empty: no intervals
    halfwidth: Mapping[int, Mapping[str, Sequence[float | None]]] = field(default_factory=dict)
    # per size, pick_correction() of the calibrated picks under `objective`; empty: none
    pick: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    objective: Mapping[str, float] | None = None  # the objective the picks were made for
    # the selectors whose predictions it was fitted on: {"selector", "aux_selector"} -> selector_digest
    selectors: Mapping[str, str] | None = None

    def to_json(self) -> str:
        hw = self.halfwidth
        return json.dumps({"features": list(FEATURES), **({"objective": dict(self.objective)} if self.objective else {}),
                           **({"selectors": dict(self.selectors)} if self.selectors else {}),
                           "sizes": {
            str(k): {"subsets": self.subsets[k], "coef": c.coef.tolist(),
                     **({"halfwidth": {lv: list(v) for lv, v in hw[k].items()}} if k in hw else {}),
                     **({"pick": dict(self.pick[k])} if k in self.pick else {})}
            for k, c in sorted(self.by_size.items())}}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "calibration") -> "MultiwayCalibration":
        try:
            raw = json.loads(text)
            if raw["features"] != list(FEATURES):
                raise ConfigError(f"{where}: written for the features {raw['features']}, this version reads "
                                  f"{list(FEATURES)}; rerun the pipeline's multiway stage")
            sizes = raw["sizes"]
            _check_fields(sizes, raw.get("objective"))
            halfwidth = {int(k): {str(lv): [None if h is None else float(h) for h in pair]
                                  for lv, pair in v["halfwidth"].items()}
                         for k, v in sizes.items() if "halfwidth" in v}
            pick = {int(k): {"targets": int(v["pick"]["targets"]), "bias": [float(b) for b in v["pick"]["bias"]],
                             "halfwidth": {str(lv): [None if h is None else float(h) for h in pair]
                                           for lv, pair in v["pick"]["halfwidth"].items()}}
                    for k, v in sizes.items() if "pick" in v}
            if any(len(pair) != 2 for hw in [*halfwidth.values(), *(p["halfwidth"] for p in pick.values())]
                   for pair in hw.values()) or any(len(p["bias"]) != 2 for p in pick.values()):
                raise ValueError("a half-width or bias is not an [expert, others] pair")
            if not all(np.isfinite(b) for p in pick.values() for b in p["bias"]):
                raise ValueError("a pick's bias is not finite")
            if not all(h is None or (np.isfinite(h) and h >= 0)
                       for hw in [*halfwidth.values(), *(p["halfwidth"] for p in pick.values())]
                       for pair in hw.values() for h in pair):
                raise ValueError("a half-width is not a finite number >= 0 (null: unbounded)")
            by_size = {}
            for k, v in sizes.items():
                try:
                    by_size[int(k)] = RetentionCalibrator(np.asarray(v["coef"], dtype=np.float64))
                except ValueError as e:
                    raise ValueError(f"sizes.{k}: {e}") from None
            objective, selectors = raw.get("objective"), raw.get("selectors")
            return cls(by_size,
                       {int(k): int(v["subsets"]) for k, v in sizes.items()}, halfwidth, pick,
                       None if objective is None else {str(n): float(w) for n, w in objective.items()},
                       None if selectors is None else {str(n): str(d) for n, d in selectors.items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: not a multi-way calibration file ({e})") from None

    def intervals(self, k: int, expert: float, others: float) -> dict[str, dict[str, list[float | None]]]:
        """Per level key: [low, high] of the calibrated expert and others' retention of a k-model
        plan (None ends: unbounded); empty where the file has no intervals for k."""
        return _bands(self.halfwidth.get(k, {}), expert, others)

    def top_plan(self, k: int, expert: float, others: float, objective: Mapping[str, float]) -> dict[str, Any]:
        """The top plan's calibrated retentions corrected for its being picked (`pick`), with their
        intervals; {"available": False, "reason": ...} where the file has no picks for size k or
        they were made for another objective (a different objective picks different plans)."""
        p = self.pick.get(k)
        if p is None:
            return {"available": False, "reason": f"the calibration holds no measured picks of {k}-way plans"}
        if self.objective is not None and dict(objective) != dict(self.objective):
            return {"available": False, "reason": f"its picks were measured for the objective {dict(self.objective)}, "
                                                  f"not {dict(objective)}"}
        e, o = expert + p["bias"][0], others + p["bias"][1]
        return {"available": True, "expert_retention": e, "others_retention": o, "bias": list(p["bias"]),
                "targets": p["targets"], "intervals": _bands(p["halfwidth"], e, o)}

    def predict(self, plans: Sequence[tuple[Fold, str, Mapping[str, float | None]]]) -> np.ndarray:
        """[n, 2]: calibrated (expert retention, others' mean retention), s_merge / s_model - 1, of
        each (fold, expert, predicted R per model); one matrix product per plan size. A size
        without a calibrator is a KeyError: callers check the sizes first."""
        out = np.empty((len(plans), 2))
        for k in {fold.k for fold, _, _ in plans}:
            rows = [i for i, (fold, _, _) in enumerate(plans) if fold.k == k]
            out[rows] = self.by_size[k].predict([plan_features(*plans[i]) for i in rows])
        return out


def _count(value: object, what: str, low: int) -> None:
    """A count as `to_json` writes it: an integer (not true, 1.5 or "8") of at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} is {value!r}, not an integer >= {low}")


def _check_fields(sizes: object, objective: object) -> None:
    """The sizes, counts, coverage levels and objective weights as `to_json` writes them: a
    hand-edited file read 1.5 picks as 1, a size "1" as a plan size, a weight "nan" as NaN."""
    if not isinstance(sizes, dict):
        raise ValueError(f"sizes is {type(sizes).__name__}, not an object")
    for k, v in sizes.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 2):
            raise ValueError(f"sizes: {k!r} is not a plan size (an integer >= 2)")
        _count(v["subsets"], f"sizes.{k}.subsets", 1)
        if "pick" in v:
            _count(v["pick"]["targets"], f"sizes.{k}.pick.targets", 1)
        for hw in (v.get("halfwidth", {}), v.get("pick", {}).get("halfwidth", {})):
            for level in hw:
                if not (level.isdigit() and 0 < int(level) < 100):
                    raise ValueError(f"sizes.{k}: coverage level {level!r} is not a percentage in (0, 100)")
    if objective is not None:
        if not isinstance(objective, dict):
            raise ValueError(f"objective is {objective!r}, not an object")
        for name, w in objective.items():
            if name not in ("retention_weight", "aux_weight"):
                raise ValueError(f"objective: unknown weight {name!r} (known: retention_weight, aux_weight)")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
                raise ValueError(f"objective.{name} is {w!r}, not a finite number")
