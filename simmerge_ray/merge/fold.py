"""A left fold of models, the shape of every multi-way merge: M_1 = m_1, M_j = arm_{j-1}(M_{j-1}, m_j).

Each step runs an arm of merge/arms.py at the share its weighting gives that step (`weighting`
None: each arm as declared, the form of pairwise merges and of plans written before weightings
existed). The planner's plans and the label run's measured merges are both folds; this is the one
place that checks a fold and says which arm each step runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.arms import WEIGHTING_NAMES, Arm, fold_arms, get_arm, get_weighting


@dataclass(frozen=True)
class Fold:
    models: tuple[str, ...]  # merge order
    operators: tuple[str, ...]  # one arm per step: len(models) - 1
    weighting: str | None = None  # merge/arms.py WEIGHTINGS; None: each arm as declared

    def __post_init__(self) -> None:
        check_fold(self.models, self.operators, self.weighting)

    @property
    def k(self) -> int:
        return len(self.models)

    def step_arms(self) -> list[Arm]:
        """The arm each step runs, at its share."""
        return fold_arms(self.operators, self.weighting)

    def linear_coefficients(self) -> dict[str, float] | None:
        """Each model's weight in the fold's result when every step is linear (M_j = a_j M_(j-1) +
        b_j m_j, multiplied out), else None. Such a fold is one linear combination: it runs in one
        pass, and folds with the same coefficients (the running mean in any order) are one merge."""
        coef = {self.models[0]: 1.0}
        for arm, model in zip(self.step_arms(), self.models[1:]):
            if arm.method != "linear":
                return None
            a, b, _ = arm.linear_form()
            coef = {m: a * w for m, w in coef.items()}
            coef[model] = coef.get(model, 0.0) + b
        return coef

    def merge_identity(self) -> tuple:
        """What the fold builds: its linear coefficients (rounded past float32) when every step is
        linear, else its order and step arms, the first two models in name order where the first
        step's arm has a mirror (TIES of (a, b) is TIES of (b, a)). Folds with one identity build one
        checkpoint (to float rounding: the order of a sum may differ)."""
        coef = self.linear_coefficients()
        if coef is not None and self.k > 1:
            return ("linear", tuple(sorted((m, round(c, 12)) for m, c in coef.items())))
        arms = self.step_arms()
        ident = (self.models, tuple(a.name for a in arms))
        mirror = arms[0].mirror() if arms else None  # (a, b) by an arm is (b, a) by its mirror: one first step
        if mirror is None:
            return ident
        swapped = ((self.models[1], self.models[0], *self.models[2:]), (mirror, *ident[1][1:]))
        return min(ident, swapped)


def check_fold(models: Sequence[str], operators: Sequence[str], weighting: str | None) -> None:
    """A ConfigError naming the fold when its steps do not match its models, a model repeats, or
    an arm or the weighting is unknown (listing the known ones)."""
    if len(operators) != max(0, len(models) - 1):
        raise ConfigError(f"plan {list(models)}: {len(operators)} operators for {len(models) - 1} steps")
    if len(set(models)) != len(models):
        raise ConfigError(f"plan {list(models)}: a model appears twice")
    for op in operators:
        get_arm(op)
    if weighting is not None and not isinstance(weighting, str):  # a list is unhashable: a TypeError below
        raise ConfigError(f"weighting: expected one of {', '.join(WEIGHTING_NAMES)} or null, got {weighting!r}")
    if weighting is not None:
        get_weighting(weighting)
