"""Sparsification of task vectors: keep the largest coordinates (TIES), a random share (DARE), the
middle of the magnitudes (breadcrumbs) or a magnitude-ranked random share (DELLA)."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.magnitude_select import select_magnitude, smallest


def rescale_l1(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its l1 norm matches `original`'s (DARE's rescaling)."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Zero all but the int(density * numel) coordinates (at least one) with the largest |delta|.

    Linear time (radix selection, magnitude_select); ties at the threshold are kept in index
    order, as a stable descending sort keeps them.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    masked = select_magnitude(delta, density)
    return rescale_l1(delta, masked) if rescale else masked


def outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` share of largest |delta| (outliers), then the smallest, to keep
    `density` of the coordinates; as mergekit, the outlier cut shrinks when both cannot be met."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    if keep <= 0 or n == 0:
        return torch.zeros_like(delta)
    n_bottom = max(0, n - keep - int(gamma * n))
    # ascending ranks [n_bottom, n_bottom + keep) of |delta| (as float32, as mergekit ranks them),
    # ties in index order: the n_bottom + keep smallest, less the n_bottom smallest; linear time
    mags = delta.abs().reshape(-1).float()
    band = smallest(mags, n_bottom + keep) & ~smallest(mags, n_bottom)
    masked = delta * band.reshape(delta.shape).to(delta.dtype)
    return rescale_l1(delta, masked) if rescale else masked


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype random masks are drawn and rescaled in, as mergekit on CPU: bf16 stays bf16,
    anything else float32 (fp16 sums of |delta| would overflow)."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each coordinate with probability `density` (a seeded Bernoulli mask)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    work = delta.to(_draw_dtype(delta.dtype))
    mask = torch.bernoulli(torch.full_like(work, density), generator=generator)
    masked = work * mask
    return (rescale_l1(work, masked) if rescale else masked).to(delta.dtype)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
             generator: torch.Generator | None) -> torch.Tensor:
    """DELLA: keep each coordinate with a probability rising linearly with its |delta| rank in
    its row, from density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    draw = _draw_dtype(delta.dtype)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(draw) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    share = ((ranks - low) / (high - low)).clamp(0, 1)
    mask = torch.bernoulli((density - epsilon) + share * 2 * epsilon, generator=generator)
    work = rows.to(draw)
    masked = work * mask
    out = rescale_l1(work, masked) if rescale else masked
    return out.to(delta.dtype).reshape(delta.shape)
