"""Model Stock: move from the base toward the fine-tunes' average by a ratio set by the angle
between their task vectors (whole tensor, or per row with filter_wise)."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def model_stock(inp: MergeInputs) -> torch.Tensor:
    base = inp.base
    assert base is not None
    if inp.options["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
    else:
        w0 = base.reshape(-1)
    ws = [t.reshape(w0.shape) for t in inp.tensors]
    deltas = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)


register(MergeMethod(
    name="model_stock",
    fn=model_stock,
    params=(Param("filter_wise", False),),
    needs_base=True,
    base_in_inputs=False,
    min_models=2,
    native_dtype=True,
    doc="t = n cos / (1 + (n - 1) cos); t mean(x_i) + (1 - t) base",
))
