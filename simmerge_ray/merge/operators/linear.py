"""Linear merge: a weighted average of the inputs (model soups)."""

from __future__ import annotations

import numpy as np

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, Value, register


def check_weights(tensor_name: str, options: dict[str, Value], per_model: dict[str, list[Value]]) -> None:
    weights = [float(w) for w in per_model["weight"]]
    if options["normalize"] and abs(sum(weights)) < 1e-12:
        raise ConfigError(f"linear: weights {weights} for tensor {tensor_name!r} sum to zero and normalize is on")


def linear_terms(options: dict[str, Value], per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
    """(weights, divisor) as mergekit evaluates linear: float32 weights, sum_i w_i x_i, then a
    division by the weights' float32 sum (added in order) when normalize, else by 1."""
    weights = [float(np.float32(w)) for w in per_model["weight"]]
    total = np.float32(0.0)
    for w in weights:
        total = np.float32(total + np.float32(w))
    return weights, float(total) if options["normalize"] else 1.0


def linear(inp: MergeInputs) -> torch.Tensor:
    weights, divisor = linear_terms(inp.options, inp.per_model)
    out = torch.zeros_like(inp.tensors[0])
    for t, w in zip(inp.tensors, weights):
        out.add_(t, alpha=w)  # a fused multiply-add, as mergekit's addcmul_
    return out.div_(divisor) if divisor != 1.0 else out


def linear_combination(_gram: np.ndarray | None, options: dict[str, Value], per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
    """The coefficients w_i / sum_j w_j (what the merge is, for the planner's features)."""
    weights = [float(w) for w in per_model["weight"]]
    total = sum(weights) if options["normalize"] else 1.0
    return [w / total for w in weights], 0.0


register(MergeMethod(
    name="linear",
    fn=linear,
    params=(Param("weight", per_model=True), Param("normalize", True)),
    check=check_weights,
    combination=linear_combination,
    combination_terms=linear_terms,
    doc="sum_i w_i x_i, divided by sum_i w_i when normalize",
))
