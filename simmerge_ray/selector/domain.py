"""What the selector's training rows covered, and flags for inputs outside it (pure numpy).

A prediction far from every training row is an extrapolation of a small MLP, whatever its
interval says (the interval is calibrated on rows like the training rows). Two checks: a
same-task pair when the labels held none (the testbed labels only cross-task pairs), and a row
whose largest standardised feature |z| exceeds what 99% of training rows stay below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from simmerge_ray.errors import ConfigError

Z_QUANTILE = 0.99  # share of training rows whose max |z| is below the threshold


def spread(out: dict[str, Any], rows: str) -> str:
    """How far an outlier (TrainingDomain.outlier) lies from `rows`, in the words the planner's
    flags and the bandit's answers share."""
    lo, hi = out["training_range"]
    return (f"99% of {rows} have every |z| <= {out['threshold']:.1f}; this feature spanned "
            f"[{lo:+.1f}, {hi:+.1f}]")


def _row_max_abs(z: np.ndarray) -> np.ndarray:
    """max |z| per row, ignoring undefined (NaN) features; 0 for a row with none defined."""
    a = np.abs(np.asarray(z, dtype=np.float64))
    return np.where(np.isnan(a), -np.inf, a).max(axis=1).clip(min=0.0)


@dataclass(frozen=True)
class TrainingDomain:
    feature_names: list[str]
    same_task_pairs: bool | None  # None: the labels did not say the auxiliaries' tasks
    z_min: np.ndarray  # per feature, over training rows
    z_max: np.ndarray
    max_abs_z: float  # Z_QUANTILE of the training rows' max |z|
    rows: int

    def outlier(self, z_row: np.ndarray) -> dict[str, Any] | None:
        """The row's most extreme feature when its |z| exceeds the threshold, else None."""
        a = _row_max_abs(np.asarray(z_row)[None, :])[0]
        if a <= self.max_abs_z:
            return None
        j = int(np.nanargmax(np.abs(z_row)))
        return {"feature": self.feature_names[j], "z": float(z_row[j]), "threshold": self.max_abs_z,
                "training_range": [float(self.z_min[j]), float(self.z_max[j])]}

    def to_dict(self) -> dict[str, Any]:
        return {"same_task_pairs": self.same_task_pairs, "rows": self.rows, "z_quantile": Z_QUANTILE,
                "max_abs_z": self.max_abs_z,
                "z_range": {n: [lo, hi] for n, lo, hi in zip(self.feature_names, self.z_min.tolist(),
                                                             self.z_max.tolist())}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], feature_names: list[str], where: str) -> "TrainingDomain":
        try:
            rng = np.array([raw["z_range"][n] for n in feature_names], dtype=np.float64).reshape(-1, 2)
            return cls(list(feature_names), raw["same_task_pairs"], rng[:, 0], rng[:, 1], float(raw["max_abs_z"]),
                       int(raw["rows"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: domain: malformed ({type(e).__name__}: {e})") from None


def training_domain(z: np.ndarray, feature_names: list[str], same_task_pairs: bool | None) -> TrainingDomain:
    """The domain of standardised training rows `z` ([n, features]; NaN = undefined)."""
    z = np.asarray(z, dtype=np.float64)
    z_min = np.nan_to_num(np.where(np.isnan(z), np.inf, z).min(axis=0), posinf=0.0)  # 0: never defined
    z_max = np.nan_to_num(np.where(np.isnan(z), -np.inf, z).max(axis=0), neginf=0.0)
    return TrainingDomain(list(feature_names), same_task_pairs, z_min, z_max,
                          float(np.quantile(_row_max_abs(z), Z_QUANTILE)), len(z))
