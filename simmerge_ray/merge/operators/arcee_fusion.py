"""Arcee Fusion: keep the other model's change only where its importance (|change| times the KL
divergence of the rows' softmaxes) is an upper outlier: >= median + 1.5 IQR."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, register

SAMPLE = 1_000_000  # quantiles of larger tensors are taken on a seeded sample of this size


def _quantiles(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator)]
    ordered = torch.sort(flat).values
    return ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]


def arcee_fusion(inp: MergeInputs) -> torch.Tensor:
    base, other = inp.base, inp.tensors[0]
    assert base is not None
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    q1, median, q3 = _quantiles(importance, inp.generator)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


register(MergeMethod(
    name="arcee_fusion",
    fn=arcee_fusion,
    params=(),
    needs_base=True,
    base_in_inputs=False,
    min_models=1,
    max_models=1,
    stochastic=True,  # only tensors above SAMPLE elements draw a sample
    native_dtype=True,
    doc="base + (x - base) where importance >= median + 1.5 IQR",
))
