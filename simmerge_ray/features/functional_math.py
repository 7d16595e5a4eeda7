"""Pure math of the functional features: KL per position, cosines per layer, depth summaries.

No I/O and no Ray here, so every formula is testable against a direct computation.
"""

from __future__ import annotations

import numpy as np
import torch

THIRDS = 3


def kl_per_position(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each row of two [T, V] log-prob tensors, in float64 (0 log 0 = 0)."""
    lp, lq = logp_p.double(), logp_q.double()
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def distribution_summary(values: np.ndarray) -> dict[str, float]:
    """Mean, median, 10th and 90th percentiles (linear interpolation) of a 1-D sample."""
    v = np.asarray(values, dtype=np.float64)
    p10, median, p90 = np.quantile(v, [0.1, 0.5, 0.9])
    return {"mean": float(v.mean()), "median": float(median), "p10": float(p10), "p90": float(p90)}


def layer_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine per layer of two [L, ...] tensors, everything after the layer axis flattened."""
    a = x.reshape(x.shape[0], -1).double()
    b = y.reshape(y.shape[0], -1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def depth_thirds(profile: torch.Tensor | np.ndarray) -> list[float]:
    """Average of a per-layer profile over relative depth [0,1/3), [1/3,2/3), [2/3,1].

    Layer l of L covers [l/L, (l+1)/L); each third averages the layers weighted by overlap,
    so the result is defined for any depth (even L < 3) and does not depend on L otherwise.
    """
    prof = np.asarray(profile, dtype=np.float64)
    n = len(prof)
    edges = np.arange(n + 1) / n
    out = []
    for k in range(THIRDS):
        lo, hi = k / THIRDS, (k + 1) / THIRDS
        overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
        out.append(float((overlap * prof).sum() / overlap.sum()))
    return out


def depth_summary(profile: torch.Tensor | np.ndarray, prefix: str) -> dict[str, float]:
    """`{prefix}_mean` over all layers plus `{prefix}_d0..d2` over relative-depth thirds."""
    prof = np.asarray(profile, dtype=np.float64)
    out = {f"{prefix}_mean": float(prof.mean())}
    out.update({f"{prefix}_d{k}": v for k, v in enumerate(depth_thirds(prof))})
    return out
