"""SCE: select the coordinates where the task vectors vary most, weight each model by its task
vector's mean square, and average with TIES's sign election."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def _select(tvs: torch.Tensor, share: float) -> torch.Tensor:
    """1 on the `share` of coordinates (among those that vary) with the largest variance."""
    if share <= 0:
        return torch.zeros_like(tvs[0])
    if share >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * share)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce(inp: MergeInputs) -> torch.Tensor:
    base = inp.base
    assert base is not None
    tvs = torch.stack([t - base for t in inp.tensors])
    share = float(inp.options["select_topk"])
    if share < 1:
        tvs = tvs * _select(tvs, share).unsqueeze(0)
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = tvs.sign() == elected
    weights = tvs.square().reshape(len(tvs), -1).mean(dim=1)
    total = weights.sum().item()
    weights = torch.ones_like(weights) / len(weights) if abs(total) < 1e-6 else weights / total
    weights = weights.reshape(-1, *([1] * base.dim())) * agree
    return base + (tvs * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


register(MergeMethod(
    name="sce",
    fn=sce,
    params=(Param("int8_mask", False), Param("select_topk", 1.0, low=0.0, high=1.0)),
    needs_base=True,
    base_in_inputs=False,
    min_models=1,
    native_dtype=True,
    doc="variance top-k selection, mean-square model weights, sign election",
))
