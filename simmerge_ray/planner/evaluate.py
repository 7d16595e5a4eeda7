"""Judging multi-way plans on the testbed's measured 3- and 4-way merges.

For every labelled subset and target task (the subset's expert of that task first), the
planner ranks the labelled orders and operator sequences with predicted utilities only; we
then read the measured expert retention (s_merge / s_expert - 1 on the target task) of
- simmerge: the planner's top plan;
- random_order: a uniformly random order, each with the planner's best operator sequence;
- each fixed operator used at every step, in a uniformly random order;
- oracle: the best measured plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import polars as pl

from simmerge_ray.merge.arms import STEP_ARMS
from simmerge_ray.planner.search import Objective, StepModel


class PlanScorer:
    """Predicted objective of given plans, sharing prefix states between plans."""

    def __init__(self, model: StepModel, objective: Objective = Objective()) -> None:
        self.model = model
        self.objective = objective
        self._states: dict[tuple, object] = {}
        self._utils: dict[tuple, np.ndarray] = {}

    def _state(self, prefix: tuple) -> object:
        if prefix not in self._states:
            if len(prefix) == 1:
                self._states[prefix] = self.model.start(prefix[0])
            else:
                *head, (model, op) = prefix
                self._states[prefix] = self.model.extend(self._state(tuple(head)), model, op)
        return self._states[prefix]

    def score(self, models: Sequence[str], ops: Sequence[str], task: str) -> float:
        prefix: tuple = (models[0],)
        u = []
        for model, op in zip(models[1:], ops):
            key = (prefix, model, task)
            if key not in self._utils:
                util, _ = self.model.step_utilities([self._state(prefix)], [model], task)
                self._utils[key] = util[0]
            u.append(float(self._utils[key][self.model.operators.index(op)]))
            prefix = prefix + ((model, op),)
        return self.objective.score(u, [])


def evaluate_multiway(labels: pl.DataFrame, scorer: PlanScorer) -> dict:
    """Mean measured expert retention per k and method (and per task), over labelled subsets.

    The random and fixed-operator baselines are expectations over the labelled orders, not
    draws, so they carry no sampling noise.
    """
    rows = (labels.filter(pl.col("k") >= 3, pl.col("expert_retention").is_not_null())
            .select(["task", "models", "operators", "k", "expert_retention"]).rows())
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for task, models, ops, k, ret in rows:
        groups[(task, tuple(sorted(models)))].append((tuple(models), tuple(ops), k, ret))
    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_task: dict[int, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    learned_vs_random: dict[str, list[float]] = defaultdict(list)
    for (task, _), plans in sorted(groups.items()):
        k = plans[0][2]
        scored = [(scorer.score(m, o, task), m, o, r) for m, o, _, r in plans]
        by_order: dict[tuple, list] = defaultdict(list)
        for s, m, o, r in scored:
            by_order[m].append((s, o, r))
        best_per_order = [max(v, key=lambda x: x[0])[2] for v in by_order.values()]
        values = {
            "simmerge": max(scored, key=lambda x: x[0])[3],
            "random_order": float(np.mean(best_per_order)),
            "oracle": max(r for *_, r in scored),
        }
        for op in STEP_ARMS:
            fixed = [r for _, _, o, r in scored if set(o) == {op}]
            if fixed:
                values[op] = float(np.mean(fixed))
        for method, v in values.items():
            per[k][method].append(v)
            per_task[k][task][method].append(v)
        learned_vs_random[task].append(values["simmerge"] - values["random_order"])
    return {
        f"{k}way": {
            "subsets": len(next(iter(per[k].values()))),
            "expert_retention": {m: float(np.mean(v)) for m, v in per[k].items()},
            "by_task": {t: {m: float(np.mean(v)) for m, v in d.items()} for t, d in per_task[k].items()},
        }
        for k in sorted(per)
    } | {"learned_minus_random_order": {t: float(np.mean(v)) for t, v in learned_vs_random.items()}}
