"""Judging multi-way plans on the testbed's measured 3- and 4-way merges.

For every labelled subset and every task of its models (that task's model is the expert), the
planner ranks the subset's labelled plans (orders with the expert anywhere, fold weightings,
step arms) with predicted values only; we then read each plan's measured retention,
s_merge / s_model - 1 of every model on its own task:
- simmerge: the planner's top plan;
- random_order: the planner's weighting and step arms in a uniformly random order (the
  expectation over the labelled orders of that rule);
- one entry per step arm: that arm at every step, in a random order under a random weighting;
- equal_share: the equal-weight linear fold (a model soup of the subset);
- oracle: the plan whose measured value of the planner's objective is best.
Each entry reports `expert_retention` (the expert's) and `mean_retention` (the mean over the
plan's models). Baselines are expectations over labelled plans, not draws: no sampling noise.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from simmerge_ray.merge.arms import STEP_ARMS
from simmerge_ray.planner.objective import Objective, Outcome
from simmerge_ray.planner.search import Replayer, StepModel

# The objective plans are judged on: the expert's side and the others' sides weigh the same, as
# in the pairwise two-sided utility.
JUDGED = Objective(retention_weight=1.0, aux_weight=1.0)
EQUAL_SHARE = ("linear", "equal")


class PlanScorer:
    """Predicted objective of given plans, sharing prefix predictions between plans of a target."""

    def __init__(self, model: StepModel, tasks: Mapping[str, str | None], objective: Objective = JUDGED) -> None:
        self.model = model
        self.tasks = tasks
        self.objective = objective
        self._replayers: dict[str, Replayer] = {}

    def score_many(self, plans: Sequence[tuple[Sequence[str], Sequence[str], str | None]], expert: str) -> list[float]:
        """Predicted objective of each (models, step arms, weighting) with `expert` as the expert."""
        task = self.tasks[expert]
        rp = self._replayers.setdefault(task, Replayer(self.model, task, self.tasks))
        return [self.objective.score(self.objective.retention(p[0][0], steps, self.tasks), expert)
                for p, steps in zip(plans, rp.replay_many(plans))]

    def score(self, models: Sequence[str], ops: Sequence[str], weighting: str | None, expert: str) -> float:
        return self.score_many([(models, ops, weighting)], expert)[0]


def _measured_score(objective: Objective, retention: Mapping[str, float | None], expert: str) -> float:
    return objective.score({m: None if r is None else 1 + r for m, r in retention.items()}, expert)


def _mean(outcomes: list[Outcome]) -> dict[str, float]:
    return {"expert_retention": float(np.nanmean([o.expert_retention for o in outcomes])),
            "mean_retention": float(np.nanmean([o.mean_retention for o in outcomes]))}


def evaluate_multiway(labels: pl.DataFrame, scorer: PlanScorer) -> dict:
    """Mean measured retentions per plan size and method, overall and per target task."""
    rows = labels.filter(pl.col("k") >= 3).select(["models", "operators", "weighting", "k", "retention"]).rows()
    subsets: dict[tuple, list[tuple]] = defaultdict(list)
    for models, ops, weighting, k, retention in rows:
        subsets[tuple(sorted(models))].append((tuple(models), tuple(ops), weighting, json.loads(retention)))
    per: dict[int, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    per_task: dict[int, dict[str, dict[str, list[Outcome]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for subset, plans in sorted(subsets.items()):
        k = len(subset)
        for expert in subset:
            task = scorer.tasks[expert]
            outcomes = [Outcome.of(r, expert) for *_, r in plans]
            predicted = scorer.score_many([(m, o, w) for m, o, w, _ in plans], expert)
            pick = int(np.argmax(predicted))
            _, p_ops, p_w, _ = plans[pick]
            same_rule = [o for (m, ops, w, _), o in zip(plans, outcomes) if ops == p_ops and w == p_w]
            measured = [_measured_score(scorer.objective, r, expert) for *_, r in plans]
            values = {"simmerge": [outcomes[pick]], "random_order": same_rule,
                      "oracle": [outcomes[int(np.argmax(measured))]]}
            for op in STEP_ARMS:
                values[op] = [o for (m, ops, w, _), o in zip(plans, outcomes) if set(ops) == {op}]
            values["equal_share"] = [o for (m, ops, w, _), o in zip(plans, outcomes)
                                     if set(ops) == {EQUAL_SHARE[0]} and w == EQUAL_SHARE[1]]
            for method, outs in values.items():
                if outs:
                    avg = Outcome(**_mean(outs))
                    per[k][method].append(avg)
                    per_task[k][task][method].append(avg)
    result: dict = {}
    for k in sorted(per):
        by_task = {t: {m: _mean(v) for m, v in d.items()} for t, d in sorted(per_task[k].items())}
        result[f"{k}way"] = {
            "subsets": len({s for s in subsets if len(s) == k}),
            "targets": len(per[k]["simmerge"]),
            **{m: _mean(v) for m, v in per[k].items()},
            "by_task": by_task,
            "learned_minus_random_order": {
                t: {key: d["simmerge"][key] - d["random_order"][key] for key in ("expert_retention", "mean_retention")}
                for t, d in by_task.items()},
        }
    result["objective"] = scorer.objective.as_dict()
    return result
