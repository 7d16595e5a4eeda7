"""Linear merge: a weighted average of the inputs (model soups)."""

from __future__ import annotations

import torch

from simmerge_ray.errors import MergeError
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def linear(inp: MergeInputs) -> torch.Tensor:
    weights = [float(w) for w in inp.per_model["weight"]]
    out = torch.zeros_like(inp.tensors[0])
    for t, w in zip(inp.tensors, weights):
        out.add_(t, alpha=w)
    if inp.options["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise MergeError(f"linear: weights {weights} sum to zero and normalize is on")
        out.div_(total)
    return out


register(MergeMethod(
    name="linear",
    fn=linear,
    params=(Param("weight", per_model=True), Param("normalize", True)),
    doc="sum_i w_i x_i, divided by sum_i w_i when normalize",
))
