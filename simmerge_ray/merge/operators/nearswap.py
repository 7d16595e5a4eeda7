"""NearSwap: take the other model's value where it is close to the base's, the base's elsewhere."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def nearswap(inp: MergeInputs) -> torch.Tensor:
    base, other = inp.base, inp.tensors[0]
    assert base is not None
    weight = (float(inp.options["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


register(MergeMethod(
    name="nearswap",
    fn=nearswap,
    params=(Param("t", low=0.0),),
    needs_base=True,
    base_in_inputs=False,
    min_models=1,
    max_models=1,
    native_dtype=True,
    doc="w = clamp(t / |base - x|, 0, 1); w x + (1 - w) base",
))
