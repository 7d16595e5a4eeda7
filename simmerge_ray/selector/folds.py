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


def leave_one_task_out(tasks: list[str], aux_tasks: list[str | None] | None) -> dict[str, Split]:
    """One split per task t: test on the pairs whose expert has task t; train on the pairs in
    which no model has it. A row's task is its expert's; a pair with t on the auxiliary side is
    the mirror of a test row (the same merge, measured once, its features nearly symmetric), so
    training on it would show the "new" task's pairs to the selector. `aux_tasks` None (labels
    without aux_task) holds out the expert side only."""
    expert = np.asarray(tasks)
    aux = np.asarray(aux_tasks if aux_tasks is not None else [None] * len(tasks), dtype=object)
    return {t: (np.flatnonzero((expert != t) & (aux != t)), np.flatnonzero(expert == t)) for t in sorted(set(tasks))}


def task_group_kfold(tasks: list[str], aux_tasks: list[str | None] | None, k: int, seed: int = 0) -> list[Split]:
    """k folds over tasks (group_kfold of the expert's task), each fold's training rows without a
    model of the fold's held-out tasks on either side, as in leave_one_task_out."""
    aux = np.asarray(aux_tasks if aux_tasks is not None else [None] * len(tasks), dtype=object)
    out = []
    for train, test in group_kfold(tasks, k, seed):
        held = {tasks[i] for i in test}
        kept = train[~np.isin(aux[train], list(held))]
        if not len(kept):
            raise ConfigError(f"task-grouped folds: holding out {', '.join(sorted(held))} leaves no pair without "
                              f"them on either side to train on (use more tasks or pair-grouped folds)")
        out.append((kept, test))
    return out
