"""Passthrough: one model's tensor, optionally scaled; with slices, the way to stack layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, Value, register

if TYPE_CHECKING:
    import numpy as np


def passthrough(inp: MergeInputs) -> torch.Tensor:
    return inp.tensors[0] * float(inp.per_model["scale"][0])


def passthrough_combination(_gram: np.ndarray | None, _options: dict[str, Value], per_model: dict[str, list[Value]]) -> tuple[list[float], float]:
    return [float(per_model["scale"][0])], 0.0


register(MergeMethod(
    name="passthrough",
    fn=passthrough,
    params=(Param("scale", 1.0, per_model=True),),
    min_models=1,
    max_models=1,
    combination=passthrough_combination,
    doc="the one input's tensor times scale (layer stacking with several slices)",
))
