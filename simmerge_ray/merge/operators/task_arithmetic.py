"""The task-arithmetic family: merges of task vectors (model - base), declared as data.

TIES, DARE, breadcrumbs, DELLA and plain task arithmetic differ only in how each task vector is sparsified and
whether a sign consensus masks disagreeing coordinates; each variant below is one row of data
over the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators import sparsify
from simmerge_ray.merge.operators.magnitude_select import MagnitudeMask
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, Value, register
from simmerge_ray.merge.operators.scratch import Scratch

if TYPE_CHECKING:
    import numpy as np


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
    deltas = []
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
        deltas.append(delta)
    return _combine(base, deltas, inp, variant)


def chunked_magnitude_task_arithmetic(inp: MergeInputs, masks: Sequence[MagnitudeMask | None], *,
                                      variant: Variant, scratch: Scratch | None = None) -> torch.Tensor:
    """The same merge on one chunk of flat tensors, with each model's magnitude mask found
    beforehand over the whole tensor (magnitude_select); chunks in index order. The result may
    live in `scratch`: use it before the next call with the same scratch."""
    base = inp.base
    assert base is not None
    deltas = [t - base if mask is None else mask.apply(t - base) for t, mask in zip(inp.tensors, masks)]
    return _combine(base, deltas, inp, variant, scratch)


def _combine(base: torch.Tensor, deltas: Sequence[torch.Tensor], inp: MergeInputs, variant: Variant,
             scratch: Scratch | None = None) -> torch.Tensor:
    """The elementwise rest: weights, the sign election, normalisation and lambda."""
    opts = inp.options
    return combine(base, deltas, inp.per_model["weight"], consensus=variant.consensus,
                   normalize=bool(opts["normalize"]), lam=float(opts["lambda"]), scratch=scratch)


def weights_in(weights: Sequence[float], dtype: torch.dtype) -> list[float]:
    """The weights as mergekit uses them: a tensor in the compute dtype, so rounded to it."""
    return [float(torch.tensor(float(w), dtype=dtype)) for w in weights]


def weight_divisor(rounded_weights: Sequence[float], dtype: torch.dtype) -> float:
    """Plain task arithmetic's normaliser: the weights' sum in the compute dtype, 1 when ~0."""
    total = float(torch.tensor(list(rounded_weights), dtype=dtype).sum())
    return total if abs(total) >= 1e-8 else 1.0


def combine(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, consensus: bool,
            normalize: bool, lam: float, scratch: Scratch | None = None) -> torch.Tensor:
    """base + lambda * (sum_i w_i d_i [agrees with the elected sign]) / divisor, as mergekit computes it.

    Every intermediate is rounded to the compute dtype (base.dtype) exactly where mergekit's
    op-by-op arithmetic in that dtype rounds it (torch computes half-precision ops in float32
    and rounds each result), so the bytes are the same; but the work runs in float32 on flat
    reusable buffers with no boolean tensors (comparisons are the slow ops on this path):
    e = +1 where sum_i w_i d_i >= 0 else -1; max(w_i d_i e, 0) keeps the agreeing part of each
    model, sign() of it counts the model in the divisor.
    """
    c, shape, k = base.dtype, base.shape, base.numel()
    s = scratch or Scratch()
    low = s.get("low", k, c)

    def rounded(t: torch.Tensor) -> torch.Tensor:
        if c != torch.float32:
            low.copy_(t)
            t.copy_(low)
        return t

    wb = weights_in(weights, c)
    wd = [s.get(("wd", i), k) for i in range(len(deltas))]
    mixed = s.get("mixed", k)
    for i, d in enumerate(deltas):
        rounded(wd[i].copy_(d.reshape(-1)).mul_(wb[i]))
        mixed.copy_(wd[i]) if i == 0 else mixed.add_(wd[i])
    rounded(mixed)
    if consensus:
        elected = mixed.sign_().add_(0.5).sign_()  # +1 where the sum is >= 0, else -1
        divisor, part = s.get("divisor", k).zero_(), s.get("part", k)
        total = s.get("total", k).zero_()
        for i, w in enumerate(wb):
            torch.mul(wd[i], elected, out=part).clamp_(min=0)
            total.add_(part)
            divisor.add_(part.sign_(), alpha=w)
        mixed = rounded(total.mul_(elected))
        rounded(divisor)
        if normalize:  # divisor 0 (no model agrees) -> 1: add 1 - |sign(divisor)|
            divisor.add_(torch.abs(divisor, out=part).sign_().neg_().add_(1))
            rounded(mixed.div_(divisor))
    elif normalize:
        rounded(mixed.div_(weight_divisor(wb, c)))
    if lam != 1:
        rounded(mixed.mul_(lam))
    flat_base = base.reshape(-1) if c == torch.float32 else s.get("base", k).copy_(base.reshape(-1))
    mixed.add_(flat_base)
    return mixed.reshape(shape) if c == torch.float32 else low.copy_(mixed).reshape(shape)


def variant_of(method: MergeMethod) -> Variant | None:
    """The task-arithmetic variant a registered method runs, or None for other methods."""
    fn = method.chunked or method.fn
    return getattr(fn, "keywords", {}).get("variant")


def check_magprune(tensor_name: str, _options: dict[str, Value], per_model: dict[str, list[Value]]) -> None:
    """DELLA draws keep probabilities in [density - epsilon, density + epsilon]: both ends must
    lie strictly inside (0, 1) for a model that is sparsified (density < 1)."""
    for d, e in zip(per_model["density"], per_model["epsilon"]):
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            raise ConfigError(f"parameter 'epsilon': density {d} +/- epsilon {e} must lie in (0, 1) "
                              f"(tensor {tensor_name!r})")


def task_arithmetic_combination(_gram: np.ndarray | None, options: dict[str, Value],
                                per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
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
