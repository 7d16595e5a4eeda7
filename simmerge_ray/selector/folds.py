"""Splits that never put one model pair on both sides of a train/test boundary."""

from __future__ import annotations

import numpy as np

from simmerge_ray.errors import ConfigError

Split = tuple[np.ndarray, np.ndarray]


def check_folds(k: int) -> None:
    if k < 2:
        raise ConfigError(f"--folds: {k} folds cannot hold a pair out (give at least 2)")


def group_kfold(groups: list[str], k: int, seed: int = 0) -> list[Split]:
    """k folds over distinct groups (unordered model pairs, or tasks), shuffled with `seed`."""
    check_folds(k)
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise ConfigError(f"need at least 2 distinct groups (model pairs or tasks) to split, got {len(uniq)}")
    k = min(k, len(uniq))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    fold_of = {uniq[i]: n % k for n, i in enumerate(order)}
    ids = np.array([fold_of[g] for g in groups])
    return [(np.flatnonzero(ids != f), np.flatnonzero(ids == f)) for f in range(k)]


def leave_one_task_out(tasks: list[str]) -> dict[str, Split]:
    """One split per task: train on every other task, test on it."""
    arr = np.asarray(tasks)
    return {t: (np.flatnonzero(arr != t), np.flatnonzero(arr == t)) for t in sorted(set(tasks))}
