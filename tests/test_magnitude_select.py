"""Magnitude top-k from chunks (TIES on tensors larger than memory) against the in-memory sort."""

from __future__ import annotations

import pytest
import torch

from simmerge_ray.merge.operators import sparsify
from simmerge_ray.merge.operators.magnitude_select import MagnitudeSelect


def _chunked(delta: torch.Tensor, density: float, rescale: bool, chunk: int) -> torch.Tensor:
    sel = MagnitudeSelect(delta.numel(), density, rescale)
    chunks = delta.split(chunk)
    for c in chunks:
        sel.first_pass(c)
    for c in chunks:
        sel.second_pass(c)
    mask = sel.mask()
    return torch.cat([mask.apply(c) for c in chunks])


@pytest.mark.parametrize("density", [0.001, 0.3, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("chunk", [97, 4096])
def test_equals_the_sort_without_ties(density: float, rescale: bool, chunk: int) -> None:
    """Distinct magnitudes (float32 noise): the same k coordinates as `sparsify.magnitude`, and
    the same l1 rescaling up to the order of summation."""
    delta = torch.randn(10_007, generator=torch.Generator().manual_seed(1)) * 0.01
    want = sparsify.magnitude(delta, density, rescale)
    got = _chunked(delta, density, rescale, chunk)
    assert torch.equal(got != 0, want != 0)
    if rescale:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [7, 333, 5000])
def test_ties_at_the_threshold_are_kept_in_index_order(chunk: int) -> None:
    """Few distinct magnitudes, many ties: exactly k kept, all above the k-th value and the
    first of the values equal to it, as a stable descending sort would keep."""
    g = torch.Generator().manual_seed(2)
    delta = torch.randint(-6, 7, (5_000,), generator=g).float() * 0.25
    for density in (0.05, 0.37, 0.5):
        k = int(density * delta.numel())
        order = torch.sort(delta.abs(), descending=True, stable=True).indices[:k]
        want = torch.zeros_like(delta)
        want[order] = delta[order]
        got = _chunked(delta, density, False, chunk)
        assert int((got != 0).sum()) == int((want != 0).sum())
        assert torch.equal(got, want)


def test_edge_densities() -> None:
    delta = torch.tensor([0.5, -2.0, 1.0, -0.25])
    assert torch.equal(_chunked(delta, 0.0, False, 2), torch.zeros(4))
    assert torch.equal(_chunked(delta, 0.01, False, 3), torch.tensor([0.0, -2.0, 0.0, 0.0]))  # at least one
    assert torch.equal(_chunked(delta, 0.75, False, 1), torch.tensor([0.5, -2.0, 1.0, 0.0]))


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_breadcrumbs_band_equals_a_stable_ascending_sort(values: str) -> None:
    """Breadcrumbs keeps ascending ranks [n_bottom, n_bottom + keep) of |delta|: found in linear
    time from both ends, exactly the band a stable sort gives, ties and zeros included."""
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(4_000, generator=g) if values == "distinct"
             else torch.randint(-5, 6, (4_000,), generator=g).float() * 0.5)
    for density, gamma in ((0.3, 0.05), (0.9, 0.2), (0.5, 0.0), (0.01, 0.5)):
        n, keep = delta.numel(), int(density * delta.numel())
        n_bottom = max(0, n - keep - int(gamma * n))
        order = torch.sort(delta.abs(), stable=True).indices[n_bottom:n_bottom + keep]
        want = torch.zeros_like(delta)
        want[order] = delta[order]
        assert torch.equal(sparsify.outliers(delta, density, gamma), want), (density, gamma)
