"""Plan search: every ordered subset and operator sequence up to 4 models, beam search beyond.

Plans grow one step at a time from an expert of the target task; the step model predicts the
utility of every operator for (merge so far, next model) in one batched call, so each prefix is
featurised once whatever the number of operators. Prefixes are shared by every plan that
extends them, which is what makes scoring all 4! * 3^3 orders-and-operators per subset cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.planner.plan import Plan

RETENTION_CLIP = (0.0, 1.5)


class StepModel(Protocol):
    """Predicts step utilities for intermediate merges that are never built."""

    operators: list[str]

    def start(self, expert: str) -> Any: ...

    def extend(self, state: Any, model: str, op: str) -> Any: ...

    def step_utilities(self, states: Sequence[Any], nexts: Sequence[str], task: str
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        """(U, V): predicted GapClosed [n, ops] of merging each state with its next model, and
        the predicted auxiliary gain [n, ops] (None when no auxiliary model is available)."""
        ...


@dataclass(frozen=True)
class Objective:
    """score = retention_weight * prod_j clip(u_j) + aux_weight * mean_j v_j.

    The product is the predicted share of the expert's gap on the target task that survives
    every step; the mean is the predicted share of the auxiliaries' own gaps brought in.
    """

    retention_weight: float = 1.0
    aux_weight: float = 0.0

    def score(self, u: Sequence[float], v: Sequence[float]) -> float:
        retention = math.prod(min(max(x, RETENTION_CLIP[0]), RETENTION_CLIP[1]) for x in u)
        aux = float(np.mean(v)) if v else 0.0
        return self.retention_weight * retention + self.aux_weight * aux


@dataclass(frozen=True)
class SearchSpace:
    task: str
    candidates: list[str]  # models that may join
    experts: list[str]  # models allowed first (experts of the task, or the required expert)
    min_k: int = 2
    max_k: int = 4
    beam_width: int = 64
    exhaustive_max_k: int = 4

    def __post_init__(self) -> None:
        if self.min_k < 2 or self.max_k < self.min_k:
            raise ConfigError(f"plan size range [{self.min_k}, {self.max_k}] is invalid (need 2 <= min <= max)")
        if not self.experts:
            raise ConfigError(f"no expert of task {self.task!r} among the candidate models")
        pool = set(self.candidates) | set(self.experts)
        if len(pool) < self.min_k:
            raise ConfigError(f"{len(pool)} models cannot make a {self.min_k}-way plan")


@dataclass
class SearchResult:
    plans: list[Plan]  # best first
    scored: int
    seconds: float
    exhaustive: bool
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> Plan:
        return self.plans[0]

    @property
    def plans_per_second(self) -> float:
        return self.scored / max(self.seconds, 1e-9)


@dataclass
class _Partial:
    state: Any
    models: list[str]
    ops: list[str]
    u: list[float]
    v: list[float]


def search(space: SearchSpace, step_model: StepModel, objective: Objective = Objective(), *,
           keep: int = 10) -> SearchResult:
    t0 = time.perf_counter()
    exhaustive = space.max_k <= space.exhaustive_max_k
    frontier = [_Partial(step_model.start(e), [e], [], [], []) for e in space.experts]
    complete: list[Plan] = []
    scored = 0
    ops = step_model.operators
    for depth in range(2, space.max_k + 1):
        jobs = [(p, m) for p in frontier for m in space.candidates if m not in p.models]
        if not jobs:
            break
        u, v = step_model.step_utilities([p.state for p, _ in jobs], [m for _, m in jobs], space.task)
        grown: list[tuple[float, _Partial]] = []
        for row, (p, m) in enumerate(jobs):
            for j, op in enumerate(ops):
                child = _Partial(None, p.models + [m], p.ops + [op], p.u + [float(u[row, j])],
                                 p.v + ([float(v[row, j])] if v is not None else []))
                score = objective.score(child.u, child.v)
                scored += 1
                if depth >= space.min_k:
                    complete.append(Plan(space.task, child.models, child.ops, child.u, child.v, score,
                                         {"retention_weight": objective.retention_weight,
                                          "aux_weight": objective.aux_weight}))
                if depth < space.max_k:
                    child.state = (p.state, m, op)  # built lazily below, only for survivors
                    grown.append((score, child))
        if not exhaustive:
            grown.sort(key=lambda sc: -sc[0])
            grown = grown[: space.beam_width]
        frontier = []
        for _, child in grown:
            prev_state, m, op = child.state
            child.state = step_model.extend(prev_state, m, op)
            frontier.append(child)
    complete.sort(key=lambda p: (-p.score, p.k, p.models, p.operators))
    return SearchResult(complete[:keep], scored, time.perf_counter() - t0, exhaustive)
