"""SLERP: spherical interpolation between the base model and one other, tensor by tensor.

The angle is taken between the whole flattened tensors; nearly parallel (or antiparallel)
tensors fall back to linear interpolation, where the spherical formula is ill-conditioned.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, Value, register

if TYPE_CHECKING:
    import numpy as np

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """(c0, c1) such that slerp(t, v0, v1) = c0 * v0 + c1 * v1.

    Exposed on its own because a SLERP merge is a linear combination with these coefficients,
    which the planner uses to propagate features exactly without building the merge.
    """
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    return slerp_coefficients_from_gram(t, torch.dot(a, a).item(), torch.dot(b, b).item(), torch.dot(a, b).item())


def slerp_coefficients_from_gram(t: float, g00: float, g11: float, g01: float) -> tuple[float, float]:
    """SLERP coefficients from the inner products <v0,v0>, <v1,v1>, <v0,v1> alone."""
    n0 = math.sqrt(max(g00, 0.0))
    n1 = math.sqrt(max(g11, 0.0))
    n0 = n0 if n0 > EPS else 1.0
    n1 = n1 if n1 > EPS else 1.0
    dot = max(-1.0, min(1.0, g01 / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def slerp(inp: MergeInputs) -> torch.Tensor:
    v0, v1 = inp.tensors  # v0 is the base model (ordered by the config layer)
    t = float(inp.options["t"])
    if v0.numel() == 0:
        return v0.clone()
    c0, c1 = slerp_coefficients(t, v0, v1)
    return v0 * c0 + v1 * c1


def slerp_combination(gram: np.ndarray, options: dict[str, Value], _per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
    c0, c1 = slerp_coefficients_from_gram(float(options["t"]), gram[0, 0], gram[1, 1], gram[0, 1])
    return [c0, c1], 0.0


register(MergeMethod(
    name="slerp",
    fn=slerp,
    params=(Param("t", low=0.0, high=1.0),),
    base_first=True,
    needs_base=True,
    min_models=2,
    max_models=2,
    combination=slerp_combination,
    combination_needs_gram=True,
    doc="spherical interpolation from base_model (t=0) to the other model (t=1)",
))
