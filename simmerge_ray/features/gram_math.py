"""Pairwise structural features from Gram matrices and sign-agreement counts (pure math, no I/O).

Rows are stacked flattened tensors: the catalog's models in order, then the base if there is
one. The streaming pass accumulates the Gram matrix in a *reference-centred* basis: with `r` the
reference row (the base, else the first model), row `i != r` holds `x_i - x_r` and row `r`
holds `x_r` itself. In that basis the task-vector Gram and every l2 distance come out without
the catastrophic cancellation of `|a|^2 + |b|^2 - 2<a, b>` between near-identical fine-tunes;
the raw Gram `<x_i, x_j>` (what the multi-way planner needs) is an exact linear transform of it.

Sums of Gram matrices over tensors are Gram matrices of the concatenated tensors, so every
summary (global, module group, depth third, layer) is exact: cosines are cosines of the
concatenation, not averages of per-tensor cosines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from simmerge_ray.features import gram_kernel

FEATURES: tuple[str, ...] = (
    "weight_cos", "l2", "l2_rel", "tv_cos", "tv_norm_a", "tv_norm_b", "tv_norm_ratio", "sign_agree",
)


PRECISIONS = ("float32", "float64")
TORCH_STEP = 1 << 17  # columns per product on the torch path: operands stay in cache


class GramAccumulator:
    """Accumulates, chunk by chunk of one tensor, the columns `cols` of the centred Gram matrix
    of `rows` stacked rows, and (when `signed`) the sign-agreement counts of the task vectors.

    Only the requested columns are computed: when one model joins a cached catalog, `cols` is
    that model alone and the work per element is O(rows), not O(rows^2). The fused C kernel
    (gram_kernel) does the work where it can be built; the torch path below is the fallback
    and gives the float64 numbers.

    `precision`: float64 (products of bf16 differences exact) or float32 (products and sums
    over 256 columns in float32, then float64; about twice as fast, ~1e-7 relative error per
    Gram entry). Sign counts are exact either way.
    """

    def __init__(self, rows: int, ref: int, cols: Sequence[int], signed: bool, use_kernel: bool = True,
                 precision: str = "float64") -> None:
        if not 0 <= ref < rows or not cols or any(not 0 <= c < rows for c in cols):
            raise ValueError(f"bad layout: {rows} rows, reference {ref}, columns {list(cols)}")
        self.rows, self.ref, self.cols, self.signed = rows, ref, list(cols), signed
        self._gram = np.zeros((rows, len(self.cols)))
        self.agree = np.zeros((rows, len(self.cols)), np.int64)  # both task vectors > 0 or both < 0
        self.disagree = np.zeros((rows, len(self.cols)), np.int64)  # one > 0, the other < 0
        self._all_cols = self.cols == list(range(rows))
        self._scratch: dict[str, np.ndarray] = {}
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        lib = gram_kernel.load() if use_kernel else None
        fits = lib is not None and rows <= gram_kernel.layout(lib)[3]
        self._kernel = gram_kernel.KernelState(lib, rows, ref, self.cols, precision == "float32") if fits else None

    @property
    def uses_kernel(self) -> bool:
        return self._kernel is not None

    def add_parts(self, parts: Sequence[torch.Tensor]) -> None:
        """Fold in one step of raw values: one flat tensor per row, in its stored dtype."""
        if self._kernel is not None:
            self._kernel.add(list(parts), self._gram, self.agree, self.disagree, self.signed)
            return
        step = TORCH_STEP
        for s in range(0, parts[0].numel(), step):
            k = min(step, parts[0].numel() - s)
            block = torch.from_numpy(self._buffer("block", (self.rows, k), np.float64))
            for i, part in enumerate(parts):
                block[i].copy_(part[s:s + k])
            self.add(block)

    def add(self, z: torch.Tensor) -> None:
        """Torch path: fold in a float64 (rows, k) block of raw values, centred in place.

        Keep k around 10^5: the (rows, k) operands then stay in cache (the product is skinny:
        rows x k times k x cols).
        """
        if z.dtype != torch.float64 or z.dim() != 2 or z.shape[0] != self.rows:
            raise ValueError(f"expected a float64 ({self.rows}, k) chunk, got {tuple(z.shape)} {z.dtype}")
        r = self.ref
        ref_row = torch.from_numpy(self._buffer("ref", (z.shape[1],), np.float64)).copy_(z[r])
        z.sub_(ref_row)
        z[r] = ref_row
        torch.from_numpy(self._gram).addmm_(z, z.T if self._all_cols else z[self.cols].T)
        if self.signed:
            self._count_signs(z.numpy())

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gram, agree, disagree), each (rows, len(cols)). With every column requested the
        kernel keeps only the upper triangle: it is mirrored here (a no-op for the torch path)."""
        out = [self._gram.copy(), self.agree.copy(), self.disagree.copy()]
        if self._all_cols:
            out = [np.triu(m) + np.triu(m, 1).T for m in out]
        return out[0], out[1], out[2]

    def _count_signs(self, z: np.ndarray) -> None:
        """Sign agreement as bit masks: AND plus popcount over 64 coordinates at a time, exact
        integers and a fraction of the cost of a matrix product of the signs."""
        k = z.shape[1]
        width = -(-k // 64) * 64  # pad to whole 64-bit words; padding bits stay zero
        pos = self._buffer("pos", (self.rows, width), np.bool_)
        neg = self._buffer("neg", (self.rows, width), np.bool_)
        np.greater(z, 0.0, out=pos[:, :k])
        np.less(z, 0.0, out=neg[:, :k])
        pos[:, k:] = neg[:, k:] = False
        pos[self.ref] = neg[self.ref] = False  # the base row has no task vector
        p = np.packbits(pos, axis=1).view(np.uint64)
        n = np.packbits(neg, axis=1).view(np.uint64)
        pc, nc = p[self.cols], n[self.cols]

        def both(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # (rows, cols) popcounts of x_i & y_j
            return np.bitwise_count(x[:, None, :] & y[None, :, :]).sum(axis=2, dtype=np.int64)

        self.agree += both(p, pc) + both(n, nc)
        self.disagree += both(p, nc) + both(n, pc)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """Scratch space reused across chunks (fresh allocations of this size cost page faults)."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape:
            buf = self._scratch[name] = np.empty(shape, dtype=dtype)
        return buf


@dataclass
class PairStats:
    """Sufficient statistics of one tensor (or a sum over tensors): the centred Gram matrix and
    sign-agreement counts between rows, all (rows, rows)."""

    centred: np.ndarray
    agree: np.ndarray
    disagree: np.ndarray

    @classmethod
    def zeros(cls, rows: int) -> "PairStats":
        return cls(np.zeros((rows, rows)), np.zeros((rows, rows), np.int64), np.zeros((rows, rows), np.int64))

    def __add__(self, other: "PairStats") -> "PairStats":
        return PairStats(self.centred + other.centred, self.agree + other.agree, self.disagree + other.disagree)


def total(stats: Iterable[PairStats], rows: int) -> PairStats:
    """Sum of per-tensor statistics: the statistics of the concatenated tensors."""
    acc = PairStats.zeros(rows)
    for s in stats:
        acc = acc + s
    return acc


def basis_change(rows: int, ref: int) -> np.ndarray:
    """T with x = T z: raw row i is centred row i plus the reference row (except the reference)."""
    t = np.eye(rows)
    t[:, ref] += 1.0
    t[ref, ref] = 1.0
    return t


def raw_gram(centred: np.ndarray, ref: int) -> np.ndarray:
    """The raw Gram <x_i, x_j> from the centred one."""
    t = basis_change(centred.shape[0], ref)
    g = t @ centred @ t.T
    return (g + g.T) / 2.0


def difference_gram(centred: np.ndarray, ref: int) -> np.ndarray:
    """<x_i - x_r, x_j - x_r>: the centred Gram with the reference row and column zeroed.

    With the base as reference this is the task-vector Gram; in general it gives
    |x_a - x_b|^2 = D_aa + D_bb - 2 D_ab for every pair, cancellation-free at the scale of
    the differences.
    """
    d = centred.copy()
    d[ref, :] = 0.0
    d[:, ref] = 0.0
    return d


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where the denominator is zero (an undefined feature, never an Inf)."""
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def pair_features(stats: PairStats, ref: int, n_models: int, has_base: bool) -> dict[str, np.ndarray]:
    """Every feature of FEATURES as an (n_models, n_models) matrix, entry [a, b] for the ordered
    pair (a, b). Task-vector features are NaN without a base, and wherever a norm is zero."""
    n = n_models
    g = raw_gram(stats.centred, ref)[:n, :n]
    d = difference_gram(stats.centred, ref)[:n, :n]
    norm = np.sqrt(np.clip(np.diag(g), 0.0, None))
    dd = np.diag(d)
    l2 = np.sqrt(np.clip(dd[:, None] + dd[None, :] - 2.0 * d, 0.0, None))
    np.fill_diagonal(l2, 0.0)
    out = {
        "weight_cos": _ratio(g, np.outer(norm, norm)),
        "l2": l2,
        "l2_rel": _ratio(l2, (norm[:, None] + norm[None, :]) / 2.0),
    }
    nan = np.full((n, n), np.nan)
    if not has_base:
        return out | {k: nan for k in FEATURES if k not in out}
    tv_norm = np.sqrt(np.clip(dd, 0.0, None))
    a = np.broadcast_to(tv_norm[:, None], (n, n)).copy()
    b = np.broadcast_to(tv_norm[None, :], (n, n)).copy()
    agree = stats.agree[:n, :n].astype(np.float64)
    both = agree + stats.disagree[:n, :n]
    return out | {
        "tv_cos": _ratio(d, np.outer(tv_norm, tv_norm)),
        "tv_norm_a": a,
        "tv_norm_b": b,
        "tv_norm_ratio": _ratio(a, b),
        "sign_agree": _ratio(agree, both),
    }
