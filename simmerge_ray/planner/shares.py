"""Predictions for a step arm at any share, from the selector's per-arm predictions.

The selector predicts one value per arm, each at the share it was labelled with (linear at 1/4,
1/2 and 3/4; SLERP and TIES at 1/2). A weighted fold step runs an arm at another share (1/3 at
step 2 of an equal-share fold). Within a family of arms that differ only in share the value is
interpolated linearly in the share (flat beyond the ends); an arm whose family has one member
borrows the shape of the family with the most members (linear), shifted to pass through its
own value. Pure functions of arrays: no I/O, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from simmerge_ray.merge.arms import get_arm


@cache
def _families(operators: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """op -> (shares, column indices) of its family within `operators`, sorted by share."""
    groups: dict[tuple, list[tuple[float, int]]] = {}
    for i, op in enumerate(operators):
        arm = get_arm(op)
        if arm.share is not None:
            groups.setdefault(arm.family(), []).append((arm.share, i))
    out = {}
    for op in operators:
        arm = get_arm(op)
        members = sorted(groups.get(arm.family(), [])) if arm.share is not None else []
        out[op] = (np.array([s for s, _ in members]), np.array([i for _, i in members], dtype=int))
    return out


def _widest(operators: tuple[str, ...]) -> str | None:
    fam = _families(operators)
    best = max(fam, key=lambda op: (len(fam[op][0]), op == operators[0]), default=None)
    return best if best is not None and len(fam[best][0]) > 1 else None


def _weights(xs: np.ndarray, x: float) -> list[tuple[int, float]]:
    """Linear interpolation in xs (sorted) as (index, weight) pairs, flat beyond the ends."""
    if x <= xs[0]:
        return [(0, 1.0)]
    if x >= xs[-1]:
        return [(len(xs) - 1, 1.0)]
    hi = int(np.searchsorted(xs, x))
    t = (x - xs[hi - 1]) / (xs[hi] - xs[hi - 1])
    return [(hi - 1, 1.0 - t), (hi, t)]


def _interp(pred: np.ndarray, xs: np.ndarray, cols: np.ndarray, x: float) -> np.ndarray:
    return sum(w * pred[:, cols[i]] for i, w in _weights(xs, x))


def at_share(pred: np.ndarray, operators: Sequence[str], op: str, share: float | None) -> np.ndarray:
    """pred [n, len(operators)] -> [n]: the value of arm `op` run at `share` (None: as declared)."""
    ops = tuple(operators)
    i = ops.index(op)
    own = get_arm(op).share
    if own is None or share is None or abs(own - share) < 1e-12:
        return pred[:, i]
    shares, cols = _families(ops)[op]
    if len(shares) > 1:
        return _interp(pred, shares, cols, share)
    ref = _widest(ops)
    if ref is None:
        return pred[:, i]  # nothing to borrow a shape from: the arm's own value
    rs, rc = _families(ops)[ref]
    return pred[:, i] + _interp(pred, rs, rc, share) - _interp(pred, rs, rc, own)
