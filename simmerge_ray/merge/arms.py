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

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    doc: str = ""

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
# The arms a multi-way fold may use at each step (each extra arm multiplies the plan space).
STEP_ARMS: tuple[str, ...] = PAPER_ARMS
_BY_NAME = {a.name: a for a in ARMS}


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
