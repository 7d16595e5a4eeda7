"""Which merges the label run measures: singles, every 2-way pair, and sampled 3-/4-way plans.

A label plan is a fold of models (merge/fold.py, METHOD.md's M_j = op_{j-1}(M_{j-1}, m_j)) and
the tasks its result is scored on. Sampling (seeded, documented in
docs/testbed.md):
  - 2-way: every ordered (expert of task t, expert of another task) pair x every operator;
  - 3-way: `subsets_3` subsets of 3 experts of distinct tasks; 4-way: `subsets_4` subsets of 4.
    Each subset is measured under every fold weighting (merge/arms.py WEIGHTINGS) x every step
    arm at every step plus `mixed_3` / `mixed_4` random mixed arm sequences, each such rule in
    every order (3-way) or in `orders_4` random orders (4-way), so that a rule's random-order
    value is an expectation over measured orders: over all orders at 3-way (the expert at every
    position); at 4-way over the sampled ones, in which each position holds each model of the
    subset equally often overall but a given expert need not sit at every position.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.arms import ARM_NAMES, STEP_ARMS, WEIGHTING_NAMES, get_arm, get_weighting
from simmerge_ray.merge.fold import Fold
from simmerge_ray.testbed.zoo_config import Float, Int  # strict: True or "8" is no count

# Bump when the scoring changes: old cached results then stop matching.
SCORE_VERSION = "loglik-v1"


class LabelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    operators: tuple[str, ...] = Field(ARM_NAMES, description="arms measured on every 2-way pair")
    step_operators: tuple[str, ...] = Field(STEP_ARMS, description="arms used as steps of sampled 3-/4-way plans")
    weightings: tuple[str, ...] = Field(WEIGHTING_NAMES, min_length=1,
                                        description="fold weightings of sampled 3-/4-way plans")
    subsets_3: Int = Field(8, ge=0)
    subsets_4: Int = Field(6, ge=0)
    mixed_3: Int = Field(2, ge=0, description="random mixed step-arm sequences per 3-way subset")
    mixed_4: Int = Field(1, ge=0, description="random mixed step-arm sequences per 4-way subset")
    orders_4: Int = Field(8, ge=1, le=24, description="random orders per 4-way subset (of the 24 a subset has)")
    seed: Int = 0
    metric: Literal["accuracy", "score"] = Field(
        "accuracy", description="what utilities are computed on: greedy answer-token accuracy, or the likelihood score")
    gap_epsilon: Float | None = Field(None, ge=0, description=(
        "pairs whose expert-aux gap is smaller are dropped (default: 0.05 in accuracy, about two standard "
        "errors of a 256-example eval set; 1e-3 in score)"))
    workers: Int = Field(2, gt=0)
    plans_per_call: Int = Field(16, gt=0)

    @field_validator("weightings")
    @classmethod
    def _known_weightings(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for w in names:
            try:
                get_weighting(w)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return names

    @property
    def epsilon(self) -> float:
        if self.gap_epsilon is not None:
            return self.gap_epsilon
        return 0.05 if self.metric == "accuracy" else 1e-3


@dataclass(frozen=True)
class LabelPlan(Fold):
    """A fold the label run measures (a single model when k = 1), scored on `tasks`."""

    tasks: tuple[str, ...] = field(kw_only=True)  # tasks the result is scored on

    def canonical(self, dtypes: Mapping[str, str] | None = None) -> LabelPlan:
        """The same merge written one fixed way, so that the label run measures each merge once:
        where the first step's arm has a mirror (linear_expert of (a, b) is linear_aux of (b, a);
        symmetric arms mirror themselves), the spelling whose first two models are in name order.
        A 3- or 4-way fold whose first step is TIES, SLERP or linear of (a, b) at equal shares is
        the same checkpoint as the one starting from (b, a), to the bit: a sum of two terms does
        not depend on their order (tests/test_arms.py). `dtypes` (each model's stored dtypes, in
        a catalog whose models are not all stored alike): a merge takes its first model's dtypes,
        so models stored differently are never swapped."""
        if self.k < 2 or self.models[:2] <= self.models[1::-1]:
            return self
        if dtypes is not None and dtypes[self.models[0]] != dtypes[self.models[1]]:
            return self
        mirror = self.step_arms()[0].mirror()
        if mirror is None:
            return self
        swapped = LabelPlan((self.models[1], self.models[0], *self.models[2:]), (mirror, *self.operators[1:]),
                            self.weighting, tasks=self.tasks[::-1] if self.k == 2 else self.tasks)
        return swapped if swapped.merge_identity() == self.merge_identity() else self

    def key(self, fingerprints: dict[str, str], task_digests: dict[str, str],
            dtypes: Mapping[str, str] | None = None) -> str:
        """Content key: model and base fingerprints, operators with their parameters, eval sets (as
        encoded: label_evals.eval_digest);
        the same for the two spellings of a fold whose first step's arm has a mirror (canonical),
        and for every fold that is the same linear combination (the running mean of three models
        in any of its six orders), made of models stored alike (`dtypes`, as in canonical: the
        merge is cast to its first model's dtypes, which then enter the key)."""
        canonical = self.canonical(dtypes)
        if canonical is not self:
            return canonical.key(fingerprints, task_digests, dtypes)
        coef = self.linear_coefficients()
        merge: dict = ({"linear": sorted([fingerprints[m], round(c, 12)] for m, c in coef.items())}
                       if coef is not None and self.k > 1 else
                       {"models": [fingerprints[m] for m in self.models], "base": fingerprints.get("base"),
                        "steps": [[arm.method, dict(arm.params)] for arm in self.step_arms()]})
        payload = {**merge, "eval": {t: task_digests[t] for t in self.tasks}, "score": SCORE_VERSION,
                   **({"dtypes": dtypes[self.models[0]]} if dtypes is not None and self.k > 1 else {})}
        return json_digest(payload)


def _distinct_task_subsets(experts: dict[str, str], k: int) -> list[tuple[str, ...]]:
    return [c for c in itertools.combinations(sorted(experts), k) if len({experts[m] for m in c}) == k]


def empty_size_reasons(experts: dict[str, str], settings: LabelSettings) -> dict[int, str]:
    """Why a plan size gets no samples in a label run: {k: reason}, for k = 2, 3, 4."""
    tasks = sorted(set(experts.values()))
    reasons = {}
    if len(tasks) < 2:
        reasons[2] = f"2-way plans pair experts of different tasks; the catalog's experts cover {len(tasks)}"
    for k, n, flag in ((3, settings.subsets_3, "--subsets-3"), (4, settings.subsets_4, "--subsets-4")):
        if n == 0:
            reasons[k] = f"{k}-way plans: {flag} is 0"
        elif len(tasks) < k:
            reasons[k] = (f"{k}-way plans need experts of {k} distinct tasks; the catalog's experts cover "
                          f"{len(tasks)} ({', '.join(tasks)})")
    return reasons


def enumerate_plans(experts: dict[str, str], all_tasks: list[str], settings: LabelSettings,
                    extra_singles: tuple[str, ...] = ("base",)) -> list[LabelPlan]:
    """All plans of a label run, in a deterministic order. `experts`: model name -> its task."""
    ops = settings.step_operators
    plans = [LabelPlan((m,), (), tasks=tuple(all_tasks)) for m in (*extra_singles, *sorted(experts))]
    for a, b in itertools.permutations(sorted(experts), 2):
        if experts[a] != experts[b]:
            plans += [LabelPlan((a, b), (op,), tasks=(experts[a], experts[b])) for op in settings.operators]
    rng = random.Random(f"labels|{settings.seed}")
    chosen = {k: rng.sample(c, min(n, len(c))) for k, n in ((3, settings.subsets_3), (4, settings.subsets_4))
              if (c := _distinct_task_subsets(experts, k))}
    for k, subsets in chosen.items():
        mixed_n = settings.mixed_3 if k == 3 else settings.mixed_4
        for subset in subsets:
            tasks = tuple(experts[m] for m in subset)
            srng = random.Random(f"labels|{settings.seed}|{'|'.join(subset)}")
            mixed = [s for s in itertools.product(ops, repeat=k - 1) if len(set(s)) > 1]
            seqs = [(op,) * (k - 1) for op in ops] + srng.sample(mixed, min(mixed_n, len(mixed)))
            orders = list(itertools.permutations(subset))
            if k == 4:
                orders = srng.sample(orders, min(settings.orders_4, len(orders)))
            plans += [LabelPlan(o, s, w, tasks=tasks) for w in settings.weightings for s in seqs for o in orders]
    return plans
