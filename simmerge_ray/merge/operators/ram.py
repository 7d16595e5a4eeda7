"""RAM and RAM+ (tensor-local): a coordinate changed by one model keeps that change, one changed
by several takes their average; RAM+ also scales each model's unique changes up by its share
of shared ones."""

from __future__ import annotations

from functools import partial

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def ram(inp: MergeInputs, *, plus: bool) -> torch.Tensor:
    base = inp.base
    assert base is not None
    eps = float(inp.options["epsilon"])
    tvs = torch.stack([t - base for t in inp.tensors]).reshape(len(inp.tensors), -1)
    changed = tvs.abs() > eps
    count = changed.sum(dim=0, keepdim=True)
    shared, unique = count > 1, count == 1
    tvs = tvs * changed
    unique_part = tvs * unique
    if plus:
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
        scale = 1 + float(inp.options["r"]) * rho.clamp(min=0, max=float(inp.options["alpha"]))
        unique_part = unique_part * scale.unsqueeze(-1)
    merged = (unique_part + tvs * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


register(MergeMethod(
    name="ram",
    fn=partial(ram, plus=False),
    params=(Param("epsilon", 1e-5, low=0.0),),
    needs_base=True,
    base_in_inputs=False,
    native_dtype=True,
    doc="unique changes kept, shared ones averaged (|delta| > epsilon counts as a change)",
))
register(MergeMethod(
    name="ramplus_tl",
    fn=partial(ram, plus=True),
    params=(Param("r", 0.1), Param("alpha", 0.2), Param("epsilon", 1e-5, low=0.0)),
    needs_base=True,
    base_in_inputs=False,
    native_dtype=True,
    doc="RAM with unique changes scaled by 1 + r clamp(shared/unique, 0, alpha), per tensor",
))
