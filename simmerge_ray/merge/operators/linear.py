"""Linear merge: a weighted average of the inputs (model soups)."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, Value, register


def check_weights(tensor_name: str, options: dict[str, Value], per_model: dict[str, list[Value]]) -> None:
    weights = [float(w) for w in per_model["weight"]]
    if options["normalize"] and abs(sum(weights)) < 1e-12:
        raise ConfigError(f"linear: weights {weights} for tensor {tensor_name!r} sum to zero and normalize is on")


def linear(inp: MergeInputs) -> torch.Tensor:
    weights = [float(w) for w in inp.per_model["weight"]]
    out = torch.zeros_like(inp.tensors[0])
    for t, w in zip(inp.tensors, weights):
        out.add_(t, alpha=w)
    if inp.options["normalize"]:
        out.div_(sum(weights))
    return out


def linear_combination(_gram, options: dict[str, Value], per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
    weights = [float(w) for w in per_model["weight"]]
    total = sum(weights) if options["normalize"] else 1.0
    return [w / total for w in weights], 0.0


register(MergeMethod(
    name="linear",
    fn=linear,
    params=(Param("weight", per_model=True), Param("normalize", True)),
    check=check_weights,
    combination=linear_combination,
    doc="sum_i w_i x_i, divided by sum_i w_i when normalize",
))
