"""The task-arithmetic family: merges of task vectors (model - base), declared as data.

TIES, DARE, breadcrumbs, DELLA and plain task arithmetic differ only in how each task vector is sparsified and
whether a sign consensus masks disagreeing coordinates; each variant below is one row of data
over the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators import sparsify
from simmerge_ray.merge.operators.magnitude_select import MagnitudeMask
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


@dataclass(frozen=True)
class Variant:
    name: str
    sparsification: str | None  # None | "magnitude" | "random" | "outliers" | "magprune"
    consensus: bool  # TIES sign election by sum
    default_normalize: bool
    default_rescale: bool


VARIANTS = (
    Variant("task_arithmetic", None, False, False, False),
    Variant("ties", "magnitude", True, True, False),
    Variant("dare_ties", "random", True, False, True),
    Variant("dare_linear", "random", False, False, True),
    Variant("breadcrumbs", "outliers", False, False, False),
    Variant("breadcrumbs_ties", "outliers", True, False, False),
    Variant("della", "magprune", True, True, True),
    Variant("della_linear", "magprune", False, False, True),
)


def generalized_task_arithmetic(inp: MergeInputs, *, variant: Variant) -> torch.Tensor:
    base = inp.base
    assert base is not None
    if not inp.tensors:
        return base.clone()
    opts = inp.options
    deltas = torch.empty((len(inp.tensors), *base.shape), dtype=base.dtype)
    for i, t in enumerate(inp.tensors):
        delta = t - base
        density = float(inp.per_model["density"][i])
        if variant.sparsification == "magnitude":
            delta = sparsify.magnitude(delta, density, bool(opts["rescale"]))
        elif variant.sparsification == "outliers":
            delta = sparsify.outliers(delta, density, float(inp.per_model["gamma"][i]), bool(opts["rescale"]))
        elif variant.sparsification == "random":
            delta = sparsify.random(delta, density, bool(opts["rescale"]), inp.generator)
        elif variant.sparsification == "magprune":
            delta = sparsify.magprune(delta, density, float(inp.per_model["epsilon"][i]), bool(opts["rescale"]),
                                      inp.generator)
        deltas[i] = delta
    return _combine(base, deltas, inp, variant)


def chunked_magnitude_task_arithmetic(inp: MergeInputs, masks: Sequence[MagnitudeMask | None], *,
                                      variant: Variant) -> torch.Tensor:
    """The same merge on one chunk of flat tensors, with each model's magnitude mask found
    beforehand over the whole tensor (magnitude_select); chunks in index order."""
    base = inp.base
    assert base is not None
    deltas = torch.empty((len(inp.tensors), *base.shape), dtype=base.dtype)
    for i, (t, mask) in enumerate(zip(inp.tensors, masks)):
        deltas[i] = t - base if mask is None else mask.apply(t - base)
    return _combine(base, deltas, inp, variant)


def _combine(base: torch.Tensor, deltas: torch.Tensor, inp: MergeInputs, variant: Variant) -> torch.Tensor:
    """The elementwise rest: weights, the sign election, normalisation and lambda."""
    opts = inp.options
    weights = torch.tensor([float(w) for w in inp.per_model["weight"]], dtype=base.dtype)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if variant.consensus:
        elected = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = (deltas.sign() == elected).to(base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if opts["normalize"]:
        mixed = mixed / divisor
    lam = float(opts["lambda"])
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def check_magprune(tensor_name: str, _options, per_model: dict[str, list]) -> None:
    """DELLA draws keep probabilities in [density - epsilon, density + epsilon]: both ends must
    lie strictly inside (0, 1) for a model that is sparsified (density < 1)."""
    for d, e in zip(per_model["density"], per_model["epsilon"]):
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            raise ConfigError(f"parameter 'epsilon': density {d} +/- epsilon {e} must lie in (0, 1) "
                              f"(tensor {tensor_name!r})")


def task_arithmetic_combination(_gram, options, per_model) -> tuple[list[float], float]:
    """base + lambda * sum_i w_i (x_i - base) / D as coefficients (D = sum w when normalize)."""
    weights = [float(w) for w in per_model["weight"]]
    total = sum(weights)
    divisor = total if options["normalize"] and abs(total) >= 1e-8 else 1.0
    coeffs = [float(options["lambda"]) * w / divisor for w in weights]
    return coeffs, 1.0 - sum(coeffs)


for _v in VARIANTS:
    register(MergeMethod(
        name=_v.name,
        fn=partial(generalized_task_arithmetic, variant=_v),
        params=(
            Param("weight", per_model=True),
            Param("density", 1.0, per_model=True, low=0.0, high=1.0),
            Param("normalize", _v.default_normalize),
            Param("rescale", _v.default_rescale),
            Param("lambda", 1.0),
            Param("int8_mask", False),
            *((Param("gamma", 0.01, per_model=True, low=0.0, high=1.0),) if _v.sparsification == "outliers" else ()),
            *((Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0),) if _v.sparsification == "magprune" else ()),
        ),
        check=check_magprune if _v.sparsification == "magprune" else None,
        needs_base=True,
        min_models=1,
        stochastic=_v.sparsification in ("random", "magprune"),
        base_in_inputs=False,
        # only plain task arithmetic is a fixed combination; sparsified variants are not
        combination=task_arithmetic_combination if _v.sparsification is None and not _v.consensus else None,
        # with each model's magnitude threshold found first, TIES is elementwise: streamable
        chunked=(partial(chunked_magnitude_task_arithmetic, variant=_v)
                 if _v.sparsification in (None, "magnitude") else None),
        chunked_masks=_v.sparsification == "magnitude",
        native_dtype=True,
        doc=f"task vectors; sparsification={_v.sparsification}, sign consensus={_v.consensus}",
    ))
