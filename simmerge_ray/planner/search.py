"""Plan search over the multi-way plan space: an ordered subset of the candidates with the
target task's expert anywhere in it, a fold weighting, and one step arm per step.

Plans grow one model at a time. Each (merge so far, next model) pair is featurised once per task
it is judged on, and the step model predicts every arm's value for it in one batched call; each
(weighting, step arm) then reads its value at the step's share (planner/shares.py). Prefixes are
shared by every plan that extends them, across weightings where the shares agree. The search is
exhaustive while the space holds at most `exhaustive_max_plans` plans, a beam beyond (`_beam`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.arms import STEP_ARMS, WEIGHTING_NAMES, check_arms, fold_arms, get_weighting, step_arm
from simmerge_ray.merge.fold import Fold
from simmerge_ray.planner.calibrate import MultiwayCalibration
from simmerge_ray.planner.objective import Objective, StepPrediction, advance, first_retention
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.shares import at_share

# `excluded` entry of a candidate that no scored complete plan holds (beam search dropped it).
NOT_REACHED = "no complete plan holding it was scored: the beam search dropped its partial plans"


class StepModel(Protocol):
    """Predicts step utilities for intermediate merges that are never built."""

    operators: list[str]  # the arms whose values step_utilities returns, in column order
    has_aux: bool  # whether step_utilities returns the auxiliary side

    def start(self, model: str) -> Any: ...

    def extend(self, state: Any, model: str, arm: Any) -> Any: ...

    def step_utilities(self, states: Sequence[Any], nexts: Sequence[str], task: str,
                       joining_tasks: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(U, V): predicted GapClosed on `task` [n, ops] of merging each state with its next
        model, and the predicted auxiliary-side GapClosed of the next model [n, ops] (None
        without an auxiliary selector); `joining_tasks` are the next models' own tasks (None for
        a model without one)."""
        ...


@dataclass(frozen=True)
class SearchSpace:
    task: str
    candidates: list[str]  # models that may join
    experts: list[str]  # the target task's experts (or the required one): every plan holds one
    min_k: int = 2
    max_k: int = 4
    beam_width: int = 64
    exhaustive_max_plans: int = 200_000
    weightings: tuple[str, ...] = WEIGHTING_NAMES
    step_arms: tuple[str, ...] = STEP_ARMS
    tasks: Mapping[str, str | None] = field(default_factory=dict)  # model -> its task

    def __post_init__(self) -> None:
        if self.min_k < 2 or self.max_k < self.min_k:
            raise ConfigError(f"plan size range [{self.min_k}, {self.max_k}] is invalid (need 2 <= min <= max)")
        if not self.experts:
            raise ConfigError(f"no expert of task {self.task!r} among the candidate models (a model is one by its "
                              f"catalog task, or name it with --required-expert / required_expert)")
        if len(self.pool) < self.min_k:
            raise ConfigError(f"{len(self.pool)} candidate model{'s' if len(self.pool) != 1 else ''} "
                              f"({', '.join(self.pool)}) cannot make a {self.min_k}-way plan (min_way / --min-way "
                              f"{self.min_k}: the smallest plan size asked for)")
        if not self.weightings or not self.step_arms:
            raise ConfigError("a search needs at least one weighting and one step arm")
        for w in self.weightings:
            get_weighting(w)
        check_arms(self.step_arms)

    @property
    def pool(self) -> list[str]:
        return list(dict.fromkeys([*self.experts, *self.candidates]))

    def size(self) -> int:
        """Plans in the space (ordered subsets of min_k..max_k models, counted with or without
        an expert: an upper bound), times weightings and step-arm sequences."""
        n = len(self.pool)
        return sum(math.perm(n, k) * len(self.weightings) * len(self.step_arms) ** (k - 1)
                   for k in range(self.min_k, self.max_k + 1))


@dataclass
class SearchResult:
    plans: list[Plan]  # best first, each merge once
    scored: int  # plans scored by the objective, partial ones included (those of fewer than min_k
    # models, those without the expert yet): the search's work, not the number of complete plans
    seconds: float
    exhaustive: bool

    @property
    def best(self) -> Plan:
        return self.plans[0]

    @property
    def plans_per_second(self) -> float:
        return self.scored / max(self.seconds, 1e-9)


@dataclass
class _Partial:
    key: tuple  # (models, resolved step arms): identifies the merge so far
    state: Any
    weighting: str
    models: list[str]
    ops: list[str]
    steps: list[StepPrediction]
    retention: dict[str, float | None]


class Replayer:
    """Step predictions with a cache keyed by the merge so far, the next model and the task, so
    plans that share a prefix (in a search or among labelled plans) share its predictions."""

    def __init__(self, model: StepModel, target: str, tasks: Mapping[str, str | None]) -> None:
        self.model = model
        self.target = target
        self.tasks = tasks
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
        self.states: dict[tuple, Any] = {}

    def state(self, models: tuple[str, ...], arms: tuple) -> Any:
        """The merge of `models` folded with `arms` (one fewer), built once."""
        key = (models, tuple(a.name for a in arms))
        if key not in self.states and len(models) == 1:
            self.states[key] = self.model.start(models[0])
        if key not in self.states:
            return self.extend(key, self.state(models[:-1], arms[:-1]), models[-1], arms[-1])
        return self.states[key]

    def extend(self, key: tuple, prev: Any, model: str, arm: Any) -> Any:
        """The state `key` (its prefix's state `prev` merged with `model` by `arm`), built once."""
        if key not in self.states:
            self.states[key] = self.model.extend(prev, model, arm)
        return self.states[key]

    def predict(self, jobs: Sequence[tuple[tuple, Any, str, str]]) -> None:
        """Fill the cache for (prefix key, state, next model, task) jobs, one call per task."""
        by_task: dict[str, list[tuple]] = {}
        for key, state, nxt, task in jobs:
            if (key, nxt, task) not in self.cache:
                by_task.setdefault(task, []).append((key, state, nxt))
        for task, rows in by_task.items():
            rows = list({(k, n): (k, s, n) for k, s, n in rows}.values())
            u, v = self.model.step_utilities([s for _, s, _ in rows], [n for _, _, n in rows], task,
                                             joining_tasks=[self.tasks.get(n) for _, _, n in rows])
            for i, (key, _, nxt) in enumerate(rows):
                self.cache[(key, nxt, task)] = (u[i:i + 1], None if v is None else v[i:i + 1])

    def tasks_of(self, models: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(t for m in models if (t := self.tasks.get(m)) is not None))

    def jobs(self, key: tuple, state: Any, models: Sequence[str], nxt: str) -> list[tuple]:
        tasks = self.tasks_of(models)
        return [(key, state, nxt, t) for t in dict.fromkeys([*tasks, self.target])]

    def step(self, key: tuple, models: Sequence[str], nxt: str, op: str, share: float | None) -> StepPrediction:
        ops = self.model.operators
        kept = {t: float(at_share(self.cache[(key, nxt, t)][0], ops, op, share)[0]) for t in self.tasks_of(models)}
        v = self.cache[(key, nxt, self.target)][1]
        joining = None if v is None else float(at_share(v, ops, op, share)[0])
        return StepPrediction(nxt, share, kept, joining)

    def replay_many(self, plans: Sequence[tuple[Sequence[str], Sequence[str], str | None]]
                    ) -> list[list[StepPrediction]]:
        """The step predictions of several plans (models, step arms, weighting; weighting None:
        each arm at its declared share), with one selector call per task for all their steps."""
        prepared, jobs = [], []
        for models, ops, weighting in plans:
            arms = fold_arms(list(ops), weighting)
            keys = []
            for j in range(1, len(models)):
                key = (tuple(models[:j]), tuple(a.name for a in arms[:j - 1]))
                jobs += self.jobs(key, self.state(tuple(models[:j]), tuple(arms[:j - 1])), models[:j], models[j])
                keys.append(key)
            prepared.append((models, ops, arms, keys))
        self.predict(jobs)
        return [[self.step(key, models[:j], models[j], ops[j - 1], arms[j - 1].share)
                 for j, key in enumerate(keys, start=1)] for models, ops, arms, keys in prepared]

    def replay(self, models: Sequence[str], ops: Sequence[str], weighting: str | None) -> list[StepPrediction]:
        """The step predictions of one plan."""
        return self.replay_many([(models, ops, weighting)])[0]


def expert_of(models: Sequence[str], experts: Sequence[str]) -> str | None:
    """The plan's expert: the first of its models that is one of the target task's experts."""
    return next((m for m in models if m in experts), None)


def make_plan(space: SearchSpace, objective: Objective, p: _Partial) -> Plan:
    """A grown partial plan as a Plan, with the expert's side of each step as its step utility."""
    models, steps, retention = p.models, p.steps, p.retention
    expert = expert_of(models, space.experts)
    e_task = space.tasks.get(expert)
    u = []
    for step in steps:
        if step.model == expert:
            u.append(1.0 if step.joining is None else step.joining)
        elif expert in models[: models.index(step.model)]:
            u.append(step.kept.get(e_task, 1.0))
        else:
            u.append(1.0)
    v = [s.joining for s in steps] if all(s.joining is not None for s in steps) else []
    return Plan(space.task, list(models), list(p.ops), u, v, objective.score(retention, expert), objective.as_dict(),
                weighting=p.weighting, expert=expert, retention=retention)


def _share_values(rp: Replayer, jobs: list[tuple[_Partial, str]], space: SearchSpace, depth: int
                  ) -> tuple[dict, dict]:
    """kept[(task, op, weighting)] and joining[(op, weighting)]: each step arm's value at the
    weighting's share of this depth, as vectors over `jobs` (NaN where a job's prefix has no
    model of that task); one interpolation per task, arm and weighting for the whole depth."""
    ops = rp.model.operators
    nan = np.full(len(ops), np.nan)
    weightings = list(dict.fromkeys(p.weighting for p, _ in jobs))
    tasks = list(dict.fromkeys(t for p, _ in jobs for t in rp.tasks_of(p.models)))
    kept, joining = {}, {}
    for t in tasks:
        rows = np.stack([rp.cache[(p.key, m, t)][0][0] if (p.key, m, t) in rp.cache else nan for p, m in jobs])
        for op in space.step_arms:
            for w in weightings:
                kept[(t, op, w)] = at_share(rows, ops, op, step_arm(op, w, depth - 1).share)
    if rp.model.has_aux:
        rows = np.stack([rp.cache[(p.key, m, rp.target)][1][0] for p, m in jobs])
        for op in space.step_arms:
            for w in weightings:
                joining[(op, w)] = at_share(rows, ops, op, step_arm(op, w, depth - 1).share)
    return kept, joining


def _kept_mean(retention: Mapping[str, float | None]) -> float:
    vals = [r for r in retention.values() if r is not None]
    return sum(vals) / len(vals) if vals else 0.0


def _beam(grown: list[tuple[float, _Partial]], width: int, experts: Sequence[str]) -> list[tuple[float, _Partial]]:
    """The partial plans a beam keeps: the best of each stratum by where the expert stands (or
    not yet in), taken in turn. Scores are comparable only within a stratum: a partial plan
    without the expert counts R_expert = 1, so one ranking of all would keep only those, and
    one whose expert joined early has been through more steps than one whose expert just joined.
    Ties are broken by content, so the pick never depends on the candidates' order."""
    strata: dict[tuple[int, str], list[tuple[float, _Partial]]] = {}
    for sc in grown:
        e = expert_of(sc[1].models, experts)
        strata.setdefault((-1 if e is None else sc[1].models.index(e), sc[1].weighting), []).append(sc)
    for group in strata.values():  # then by what the plan's models keep on average (the objective may not count it)
        group.sort(key=lambda sc: (-sc[0], -_kept_mean(sc[1].retention), sc[1].models, sc[1].ops, sc[1].weighting))
    kept: list[tuple[float, _Partial]] = []
    for rank in range(max(map(len, strata.values()), default=0)):
        for _, group in sorted(strata.items()):
            if rank < len(group):
                kept.append(group[rank])
                if len(kept) == width:
                    return kept
    return kept


def _distinct_merges(ranked: list[tuple[float, _Partial]], keep: int) -> list[tuple[float, _Partial]]:
    """The first `keep` plans of a ranking that build different checkpoints, each under its best
    score: two weightings can give the same shares (`equal` and `half` at 2-way), and linear folds
    with the same coefficients are one merge ([a, b, c] under `half` and [c, a, b] under `anchor`),
    so the runner-up is another merge and the margin means something."""
    seen: set[tuple] = set()
    out: list[tuple[float, _Partial]] = []
    for sc in ranked:
        c = sc[1]
        ident = Fold(tuple(c.models), tuple(c.ops), c.weighting).merge_identity()
        if ident not in seen:
            seen.add(ident)
            out.append(sc)
            if len(out) == keep:
                break
    return out


def search(space: SearchSpace, step_model: StepModel, objective: Objective = Objective(), *,
           keep: int = 10, calibration: MultiwayCalibration | None = None) -> SearchResult:
    """The `keep` best plans of the space. With `calibration` (planner/calibrate.py), complete
    plans are ranked by the objective on their calibrated retentions, for sizes it covers."""
    t0 = time.perf_counter()
    if calibration is not None:
        missing = [k for k in range(space.min_k, space.max_k + 1) if k not in calibration.by_size]
        if missing:
            raise ConfigError(f"the calibration covers plans of {sorted(calibration.by_size)} models, not "
                              f"{missing}: set --min-way/--max-way within it, or plan without --calibration")
    exhaustive = space.size() <= space.exhaustive_max_plans
    rp = Replayer(step_model, space.task, space.tasks)
    # Without an auxiliary selector nothing predicts what a model keeps when it joins a merge, so
    # the expert goes first (its retention is then a product of predicted GapClosed).
    starts = space.pool if step_model.has_aux else list(space.experts)
    frontier = [_Partial(((m,), ()), rp.state((m,), ()), w, [m], [], [], first_retention(m, space.tasks))
                for w in space.weightings for m in starts]
    complete: list[tuple[float, _Partial]] = []
    scored = 0
    for depth in range(2, space.max_k + 1):
        jobs = [(p, m) for p in frontier for m in space.pool if m not in p.models]
        if not jobs:
            break
        rp.predict([j for p, m in jobs for j in rp.jobs(p.key, p.state, p.models, m)])
        kept, joining = _share_values(rp, jobs, space, depth)
        grown: list[tuple[float, _Partial]] = []
        for i, (p, m) in enumerate(jobs):
            p_tasks = rp.tasks_of(p.models)
            models = p.models + [m]
            expert = expert_of(models, space.experts)
            for op in space.step_arms:
                arm = step_arm(op, p.weighting, depth - 1)
                j = joining.get((op, p.weighting))
                step = StepPrediction(m, arm.share, {t: float(kept[(t, op, p.weighting)][i]) for t in p_tasks},
                                      None if j is None else float(j[i]))
                retention = advance(p.retention, step, space.tasks)
                score = objective.score(retention, expert)
                scored += 1
                child = _Partial((tuple(models), p.key[1] + (arm.name,)), (p.state, m, arm), p.weighting, models,
                                 p.ops + [op], p.steps + [step], retention)
                if depth >= space.min_k and expert is not None:
                    complete.append((score, child))
                if depth < space.max_k:
                    grown.append((score, child))
        if not exhaustive:
            grown = _beam(grown, space.beam_width, space.experts)
        frontier = []
        for _, child in grown:
            child.state = rp.extend(child.key, *child.state)  # built only for the survivors
            frontier.append(child)
    if not complete:
        raise ConfigError(f"no plan of {space.min_k}-{space.max_k} models holds an expert of {space.task!r}")
    calibrated: dict[int, tuple[float, float]] = {}  # id(plan) -> calibrated (expert, others) retention
    if calibration is not None:  # complete plans are ranked on the calibrated retentions instead
        pred = calibration.predict([(Fold(tuple(c.models), tuple(c.ops), c.weighting),
                                     expert_of(c.models, space.experts), c.retention) for _, c in complete])
        calibrated = {id(c): (float(e), float(o)) for (_, c), (e, o) in zip(complete, pred)}
        complete = [(objective.retention_weight * e + objective.aux_weight * o, c)
                    for (_, c), (e, o) in zip(complete, pred)]
    complete.sort(key=lambda sc: (-sc[0], len(sc[1].models), sc[1].models, sc[1].ops, sc[1].weighting))
    best_with: dict[str, float] = {}
    for score, c in complete:
        for x in c.models:
            best_with.setdefault(x, score)  # sorted best first: the first score seen is the best
    listed = _distinct_merges(complete, keep)
    plans = [make_plan(space, objective, c) for _, c in listed]
    for plan, (score, c) in zip(plans, listed):
        if id(c) in calibrated:
            e, o = calibrated[id(c)]
            plan.calibrated = {"expert_retention": e, "others_retention": o, "score": score,
                               "subsets": calibration.subsets[plan.k],
                               "intervals": calibration.intervals(plan.k, e, o)}
    best, best_score = plans[0], listed[0][0]
    if best.calibrated:  # the top plan is picked for its high score: corrected for that
        best.calibrated["top_plan"] = calibration.top_plan(best.k, best.calibrated["expert_retention"],
                                                           best.calibrated["others_retention"], objective.as_dict())
    best.excluded = [{"model": m, "best_score_with": best_with[m], "effect": best_with[m] - best_score}
                     if m in best_with else
                     {"model": m, "best_score_with": None, "effect": None, "reason": NOT_REACHED}
                     for m in space.pool if m not in best.models]
    return SearchResult(plans, scored, time.perf_counter() - t0, exhaustive)
