"""The bandit's declared input bounds, in one place: the HTTP models, the core and the docs use them.

A reward is a merge's utility (GapClosed-like, around [-2, 2]); REWARD_BOUND leaves room for
outliers while keeping one reward from swamping a posterior. Raw pair features are similarities,
norms and KL bounds far below FEATURE_BOUND, which only rules out values no real feature takes
(1e308 overflows the posterior's products). Both are checked at the HTTP front and again in the
core, so a caller that bypasses HTTP (the actor, the simulator) gets the same refusal. A missing
feature is not a bad value (encoders impute it): JSON null over HTTP, where a NaN literal is
refused, and NaN inside Python, where it is the only way to say missing.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from simmerge_ray.bandit.errors import BanditError, FeatureError, RewardError

REWARD_BOUND = 10.0
FEATURE_BOUND = 1e6
PRIOR_VAR_RANGE = (1e-6, 1e6)  # a new arm's prior variance: 1/var enters the posterior's precision
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a decision with 10,000 features is about 200 kB of JSON
MAX_FEATURES = 10_000  # raw feature width; the body limit caps it anyway


def _is_number(value: object) -> bool:
    """A real number, numpy's included (np.float32 is one), and not a bool (True is not 1 here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_reward(reward: object) -> float:
    """The reward as a float, or RewardError naming the field and the bound."""
    if not _is_number(reward):
        raise RewardError(f"reward: must be a number, got {reward!r}")
    value = float(reward)
    if not (np.isfinite(value) and abs(value) <= REWARD_BOUND):
        raise RewardError(f"reward: must be a finite number in [-{REWARD_BOUND:g}, {REWARD_BOUND:g}], "
                          f"got {value:g}")
    return value


def check_prior_var(prior_var: float | None) -> float | None:
    """None (the config's default) or a variance inside PRIOR_VAR_RANGE."""
    low, high = PRIOR_VAR_RANGE
    if prior_var is None:
        return None
    if not _is_number(prior_var):
        raise BanditError(f"prior_var: must be a number, got {prior_var!r}")
    if not (low <= prior_var <= high):  # NaN fails both comparisons
        raise BanditError(f"prior_var: must be in [{low:g}, {high:g}], got {prior_var:g}")
    return float(prior_var)


def check_features(x: np.ndarray | Sequence[float | None], width: int) -> np.ndarray:
    """x as a float64 [n, width] matrix, or FeatureError naming the first bad value's index.

    NaN (or None) marks a feature that is undefined for this pair, as in the feature table (e.g.
    the columns measured on the auxiliary's task when the auxiliary has none); the encoders
    impute it with the offline mean, as the selector does. Infinite and out-of-bound values are
    refused."""
    arr = np.asarray(x, dtype=np.float64)  # None becomes NaN
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != width:
        raise FeatureError(f"features: expected width {width}, got shape {tuple(arr.shape)}")
    bad = np.abs(arr) > FEATURE_BOUND  # NaN compares False: missing, not bad
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise FeatureError(f"features[{col}]: must be a finite number in [-{FEATURE_BOUND:g}, "
                           f"{FEATURE_BOUND:g}] or missing (null), got {arr[row, col]:g}")
    return arr
