"""Multi-SLERP: a weighted mean of several models (or task vectors) on the hypersphere, taken in
the tangent space at their weighted Euclidean mean direction, rescaled by their mean norm."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import MergeError
from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def multislerp(inp: MergeInputs) -> torch.Tensor:
    if len(inp.tensors) == 1:
        return inp.tensors[0]
    eps = float(inp.options["eps"])
    stacked = torch.stack(inp.tensors)
    if inp.base is not None:
        stacked -= inp.base
    flat = stacked.view(len(inp.tensors), -1)
    weights = torch.tensor([float(w) for w in inp.per_model["weight"]], dtype=flat.dtype)
    if inp.options["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(inp.tensors) != 2:
            raise MergeError("multislerp: the weighted sum of the inputs' directions is zero (antipodal inputs "
                             "with balancing weights); change the weights")
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return out if inp.base is None else out + inp.base
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
    length = torch.norm(tangent) + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out if inp.base is None else out + inp.base


register(MergeMethod(
    name="multislerp",
    fn=multislerp,
    params=(Param("weight", per_model=True), Param("normalize_weights", True), Param("eps", 1e-8, low=0.0)),
    base_in_inputs=False,
    min_models=1,
    native_dtype=True,
    doc="barycentric interpolation on the hypersphere (of task vectors when a base is given)",
))
