"""NuSLERP: SLERP between two models (or their task vectors, given a base), t set by weights,
over the whole flattened tensor or row by row / column by column."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def spherical(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
              eps: float = 1e-8) -> torch.Tensor:
    """SLERP along the last axis (rows), the first (row_wise) or of the flattened tensors;
    (nearly) colinear vectors are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(inp: MergeInputs) -> torch.Tensor:
    w0, w1 = (float(w) for w in inp.per_model["weight"])
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = inp.tensors
    kw = {"row_wise": bool(inp.options["nuslerp_row_wise"]), "flatten": bool(inp.options["nuslerp_flatten"])}
    if inp.base is None:
        return spherical(t, a, b, **kw)
    return inp.base + spherical(t, a - inp.base, b - inp.base, **kw)


register(MergeMethod(
    name="nuslerp",
    fn=nuslerp,
    params=(Param("weight", per_model=True), Param("nuslerp_row_wise", False), Param("nuslerp_flatten", True)),
    base_in_inputs=False,
    min_models=2,
    max_models=2,
    native_dtype=True,
    doc="SLERP with t = w_1 / (w_0 + w_1), of task vectors when a base is given",
))
