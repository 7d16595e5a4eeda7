"""The arms: every (operator, parameters) choice the project selects between, declared once as data.

An arm merges two inputs, `first` (the expert, or the merge so far in a multi-way fold) and
`second` (the joining model). The labels measure every arm, the selector and the bandit predict
one utility per arm, the planner uses arms as fold steps, and the report lists them: all of them
read the tuple below and nothing else, so adding an arm is one `Arm(...)` line (plus its
function in the operator registry if it needs a new one).

Per-model parameters are pairs `[first, second]`. Methods whose `base_in_inputs` is set (linear,
SLERP) see `first` as mergekit's `base_model` where they need one (SLERP's t=0 end); task-vector
methods (TIES & co) work on differences against the catalog's base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators import get_method


@dataclass(frozen=True)
class Arm:
    """A named merge choice: a registered method and the parameter values it is applied with."""

    name: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    paper: bool = False  # one of the paper's three operators (one-sided GapClosed is reported for these)
    doc: str = ""  # one line: what it does (`label --help` lists it)

    @property
    def needs_base(self) -> bool:
        """Task-vector arms need the catalog's base model."""
        return not get_method(self.method).base_in_inputs

    def linear_form(self) -> tuple[float, float, float] | None:
        """The merge as c_first * first + c_second * second + c_base * base, tensor by tensor.

        Exact for linear and task arithmetic; for sparsified task-vector arms (TIES, DARE,
        breadcrumbs) the dense task-arithmetic combination with the same weights, a proxy.
        None where the coefficients depend on the tensors themselves (SLERP).
        """
        method = get_method(self.method)
        per_model, options = method.resolve(self.params, 2)
        if method.combination is not None and not method.combination_needs_gram:
            (c1, c2), cb = method.combination(None, options, per_model)
            return c1, c2, cb
        if method.combination_needs_gram:
            return None
        from simmerge_ray.merge.operators.task_arithmetic import task_arithmetic_combination

        (c1, c2), cb = task_arithmetic_combination(None, options, per_model)
        return c1, c2, cb

    @property
    def share(self) -> float | None:
        """The joining (second) model's share of the merge, where the arm has one: SLERP's t, or
        the second weight over the sum for normalised weighted arms; None otherwise (task
        arithmetic adds whole task vectors, so it has no share to move)."""
        if "t" in self.params:
            return float(self.params["t"])
        w = self.params.get("weight")
        if isinstance(w, (list, tuple)) and self.params.get("normalize") and sum(w) > 0:
            return float(w[1]) / float(sum(w))
        return None

    def at_share(self, w: float) -> "Arm":
        """This arm with the joining model's share set to `w` (a weighted fold step); the arm
        itself when `w` is already its share, so equal steps keep their names and label keys."""
        own = self.share
        if own is None:
            raise ConfigError(f"arm {self.name!r} has no share to set (a weighted step needs linear, "
                              f"SLERP or a normalised task-vector arm)")
        if not 0.0 <= w <= 1.0:
            raise ConfigError(f"arm {self.name!r}: share {w} is outside [0, 1]")
        if abs(own - w) < 1e-12:
            return self
        key = "t" if "t" in self.params else "weight"
        value = float(w) if key == "t" else [1.0 - float(w), float(w)]
        return replace(self, name=f"{self.name}@{w:.4g}", params={**self.params, key: value})

    def family(self) -> tuple[str, str]:
        """Arms that differ only in their share form one family (linear, linear_expert,
        linear_aux): the planner interpolates a family's predictions between their shares."""
        rest = {k: v for k, v in self.params.items() if k not in ("t", "weight")}
        return self.method, repr(sorted(rest.items()))

    def mirror(self) -> str | None:
        """The arm that gives the same merge with the inputs swapped (itself when symmetric); None
        for stochastic methods, whose seeded masks follow the input order."""
        if get_method(self.method).stochastic:
            return None
        swapped = {k: (list(reversed(v)) if isinstance(v, (list, tuple)) else v) for k, v in self.params.items()}
        if get_method(self.method).base_first:  # SLERP: swapping the ends maps t to 1 - t
            swapped["t"] = 1.0 - float(self.params.get("t", 0.5))
        for arm in ARMS:
            if arm.method == self.method and dict(arm.params) == swapped:
                return arm.name
        return None

    def mergekit_config(self, first: str, second: str, base: str | None) -> dict[str, Any]:
        """A mergekit YAML (as a dict) that merges `first` and `second` with this arm."""
        method = get_method(self.method)
        per = [{k: v[i] for k, v in self.params.items() if isinstance(v, (list, tuple))} for i in range(2)]
        glob = {k: v for k, v in self.params.items() if not isinstance(v, (list, tuple))}
        cfg: dict[str, Any] = {"merge_method": self.method}
        if method.base_in_inputs:
            if method.base_first:
                cfg["base_model"] = first
        else:
            if base is None:
                raise ConfigError(f"arm {self.name!r} ({self.method}) needs the catalog's base model")
            cfg["base_model"] = base
        cfg["models"] = [{"model": m, **({"parameters": p} if p else {})} for m, p in ((first, per[0]), (second, per[1]))]
        if glob:
            cfg["parameters"] = glob
        return cfg


_PAIR = [1.0, 1.0]

# The arms, in report order. The first three are the paper's operators with their usual defaults.
ARMS: tuple[Arm, ...] = (
    Arm("linear", "linear", {"weight": [0.5, 0.5], "normalize": True}, paper=True,
        doc="the weighted mean of the two models, equal shares"),
    Arm("slerp", "slerp", {"t": 0.5}, paper=True,
        doc="spherical interpolation, halfway"),
    Arm("ties", "ties", {"weight": _PAIR, "density": [0.5, 0.5], "normalize": True}, paper=True,
        doc="TIES: top-50% task-vector coordinates, sign election, disjoint mean"),
    Arm("task_arithmetic", "task_arithmetic", {"weight": _PAIR, "lambda": 1.0},
        doc="the sum of both task vectors added to the base"),
    Arm("ties_sparse", "ties", {"weight": _PAIR, "density": [0.2, 0.2], "normalize": True},
        doc="TIES keeping the top 20% of each task vector"),
    Arm("dare_ties", "dare_ties", {"weight": _PAIR, "density": [0.5, 0.5], "normalize": True},
        doc="DARE: random 50% of each task vector, rescaled, then TIES's sign election (seeded per tensor)"),
    Arm("breadcrumbs_ties", "breadcrumbs_ties", {"weight": _PAIR, "density": [0.8, 0.8], "gamma": 0.02,
                                                 "normalize": True},
        doc="breadcrumbs: drops the largest 2% and the smallest 18% of each task vector, sign election"),
    Arm("linear_expert", "linear", {"weight": [0.75, 0.25], "normalize": True},
        doc="the weighted mean leaning towards the first model (75/25)"),
    Arm("linear_aux", "linear", {"weight": [0.25, 0.75], "normalize": True},
        doc="the weighted mean leaning towards the second model (25/75)"),
)

ARM_NAMES: tuple[str, ...] = tuple(a.name for a in ARMS)
PAPER_ARMS: tuple[str, ...] = tuple(a.name for a in ARMS if a.paper)
# The arms a multi-way fold may use at each step (each extra arm multiplies the plan space),
# applied at the share the plan's weighting gives each step.
STEP_ARMS: tuple[str, ...] = PAPER_ARMS
_BY_NAME = {a.name: a for a in ARMS}


@dataclass(frozen=True)
class Weighting:
    """How a left fold shares weight: step j (j >= 1, joining the (j+1)-th model) gives the
    joining model `share(j)` and the merge so far the rest."""

    name: str
    share: Callable[[int], float]
    doc: str = ""


# The fold weightings of multi-way plans, in report order. With the position of the expert free,
# "anchor" with the expert first and "half" with the expert last are the two that favour it.
WEIGHTINGS: tuple[Weighting, ...] = (
    Weighting("half", lambda j: 0.5, doc="every step 0.5/0.5: the last model ends at 1/2, the first two at 1/2^(k-1)"),
    Weighting("equal", lambda j: 1.0 / (j + 1), doc="the running mean: step j gives 1/(j+1), every model ends at 1/k"),
    Weighting("anchor", lambda j: 1.0 / (j + 2), doc="the first model counts twice: it ends at 2/(k+1), the others at 1/(k+1)"),
)
WEIGHTING_NAMES: tuple[str, ...] = tuple(w.name for w in WEIGHTINGS)
_WEIGHTINGS = {w.name: w for w in WEIGHTINGS}


def get_weighting(name: str) -> Weighting:
    try:
        return _WEIGHTINGS[name]
    except KeyError:
        raise ConfigError(f"unknown weighting {name!r}; known: {', '.join(WEIGHTING_NAMES)}") from None


def fold_arms(operators: tuple[str, ...] | list[str], weighting: str | None) -> list[Arm]:
    """The arm each step of a fold runs: `weighting` None runs every arm as declared (pairwise
    plans, and folds written before weightings existed), else each at its step's share."""
    if weighting is None:
        return [get_arm(op) for op in operators]
    return [step_arm(op, weighting, j) for j, op in enumerate(operators, start=1)]


@cache  # pure, and called once per grown plan by the search
def step_arm(op: str, weighting: str, j: int) -> Arm:
    """The arm that step j of a fold with `weighting` runs: `op` at that step's share."""
    return get_arm(op).at_share(get_weighting(weighting).share(j))


def get_arm(name: str) -> Arm:
    """Look an arm up by name; the error lists what exists."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown arm {name!r}; known: {', '.join(ARM_NAMES)}") from None


def check_arms(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a list of arm names (e.g. from a command line); returns it as a tuple."""
    for n in names:
        get_arm(n)
    return tuple(names)


# The arms of the synthetic bandit problem (bandit/synthetic.py): the paper's three and a
# stochastic one. Its seeded tables draw one column per arm in this order, so the order is
# written out here rather than derived from ARMS.
SYNTHETIC_BANDIT_ARMS: tuple[str, ...] = check_arms(("linear", "slerp", "ties", "dare_ties"))
