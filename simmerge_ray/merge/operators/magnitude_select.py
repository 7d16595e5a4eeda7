"""TIES's magnitude top-k in linear time, over a tensor seen whole or in chunks (pure math, no I/O).

The k-th largest |delta| is found by radix selection on the bits of |delta|, which order
non-negative floats as integers do. A 16-bit compute dtype (bf16, fp16) has 65,536 bit patterns:
one histogram pass gives the exact threshold. float32 needs two: a first pass counts the top 16
bits of every |delta|, a second counts the low 16 bits inside the one bucket that holds the k-th
value. Either way that gives the exact threshold and how many values equal to it are kept; ties
are kept in index order, as a stable descending sort keeps them. Linear time replaces the
O(n log n) argsort, and chunks let a tensor larger than memory be selected.
"""

from __future__ import annotations

from dataclasses import dataclass

from simmerge_ray.lazy_torch import torch

BUCKETS = 1 << 16


def _bits(absd: torch.Tensor) -> torch.Tensor:
    """|delta|'s bit pattern as a non-negative int32 (16-bit dtypes: the pattern itself)."""
    return absd.contiguous().view(torch.int16 if absd.element_size() == 2 else torch.int32).to(torch.int32)


def _split(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket, count above it): the highest bucket where the running count from the top
    reaches k."""
    from_top = hist.flip(0).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    return BUCKETS - 1 - pos, int(from_top[pos] - hist[BUCKETS - 1 - pos])


@dataclass
class MagnitudeMask:
    """Keeps |delta| > value, plus the first `ties` values equal to it in index order, scaled by
    `scale` (the l1 rescaling). Chunks must be given in index order."""

    value: float
    ties: int
    scale: float = 1.0

    def _tied(self, absd: torch.Tensor) -> torch.Tensor | None:
        """The values equal to the threshold still kept in this chunk (index order), or None;
        advances the count of ties left to keep."""
        if self.ties <= 0:
            return None
        equal = absd == self.value
        first = equal & (equal.cumsum(0) <= self.ties)
        self.ties -= min(self.ties, int(equal.sum()))
        return first

    def keep(self, values: torch.Tensor) -> torch.Tensor:
        """The boolean mask itself, for a chunk of `values` (advances the ties kept, as `apply`)."""
        absd = values.abs()
        keep = absd > self.value
        tied = self._tied(absd)
        return keep if tied is None else keep | tied

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        absd = delta.abs()
        # 1 where |delta| > value, else 0, without a boolean tensor (the slow ops here): the
        # difference of two distinct floats of one dtype is never rounded to zero.
        keep = absd.sub(self.value).clamp_(min=0).sign_()
        tied = self._tied(absd)
        if tied is not None:
            keep.add_(tied)
        out = keep.mul_(delta)
        return out.mul_(self.scale) if self.scale != 1.0 else out


class MagnitudeSelect:
    """The mask keeping the k = max(1, int(density * numel)) largest |delta| (as mergekit's
    magnitude sparsification), from one pass over the chunks of a flat tensor (16-bit dtypes) or
    two (float32): call `first_pass` on every chunk, then `second_pass` on every chunk when
    `needs_second_pass`, then `mask()`."""

    def __init__(self, numel: int, density: float, rescale: bool, *, count: int | None = None) -> None:
        if count is not None:  # exactly `count` values, none when 0
            self.k = max(0, min(count, numel))
        else:
            self.k = max(1, int(density * numel)) if density > 0 and numel else 0
        self.rescale = rescale
        self.high = torch.zeros(BUCKETS, dtype=torch.int64)
        self.low = torch.zeros(BUCKETS, dtype=torch.int64)
        self.high_l1 = torch.zeros(BUCKETS, dtype=torch.float64)  # sum |delta| per first-pass bucket
        self.bucket: int | None = None  # the top-bits bucket holding the k-th value, after pass 1
        self._above = 0  # values in buckets above it
        self._dtype: torch.dtype | None = None

    @property
    def needs_second_pass(self) -> bool:
        return self._dtype is None or self._dtype.itemsize == 4

    def first_pass(self, delta: torch.Tensor) -> None:
        self._dtype = delta.dtype
        absd = delta.abs()
        high = _bits(absd)
        if high.element_size() == 4 and delta.element_size() == 4:
            high = high >> 16
        self.high += torch.bincount(high, minlength=BUCKETS)
        if self.rescale:
            self.high_l1 += torch.bincount(high, weights=absd.double(), minlength=BUCKETS)

    def second_pass(self, delta: torch.Tensor) -> None:
        if not self.needs_second_pass:
            return
        if self.bucket is None:
            self.bucket, self._above = _split(self.high, self.k)
        bits = _bits(delta.abs())
        inside = bits[(bits >> 16) == self.bucket]
        self.low += torch.bincount(inside & (BUCKETS - 1), minlength=BUCKETS)

    def add_counts(self, high: torch.Tensor, dtype: torch.dtype) -> None:
        """A first pass's histogram counted elsewhere (the fused kernel), for deltas of `dtype`."""
        self._dtype = dtype
        self.high += high

    def low_bucket(self) -> int:
        """float32's second pass: the top-bits bucket whose low bits it counts."""
        if self.bucket is None:
            self.bucket, self._above = _split(self.high, self.k)
        return self.bucket

    def add_low_counts(self, low: torch.Tensor) -> None:
        self.low += low

    def mask(self) -> MagnitudeMask:
        """The mask, once the passes have seen every chunk."""
        if self.k == 0:
            return MagnitudeMask(float("inf"), 0)
        if not self.needs_second_pass:
            return self._mask16()
        if self.bucket is None:  # no chunk at all went through second_pass (k > 0 means there were some)
            raise RuntimeError("MagnitudeSelect.mask() before second_pass")
        need = self.k - self._above
        j, above_in = _split(self.low, need)
        value = float(torch.tensor([(self.bucket << 16) | j], dtype=torch.int32).view(torch.float32))
        ties = need - above_in
        scale = 1.0
        if self.rescale:
            lows = torch.arange(j + 1, BUCKETS, dtype=torch.int32) | (self.bucket << 16)
            inside_l1 = float((self.low[j + 1:].double() * lows.view(torch.float32).double()).sum())
            scale = self._scale(float(self.high_l1[self.bucket + 1:].sum()) + inside_l1 + ties * value)
        return MagnitudeMask(value, ties, scale)

    def _mask16(self) -> MagnitudeMask:
        j, above = _split(self.high, self.k)
        value = float(torch.tensor([j], dtype=torch.int32).to(torch.int16).view(self._dtype))
        ties = self.k - above
        scale = self._scale(float(self.high_l1[j + 1:].sum()) + ties * value) if self.rescale else 1.0
        return MagnitudeMask(value, ties, scale)

    def _scale(self, kept: float) -> float:
        """total l1 / kept l1, or 1 when either is ~0, in the arithmetic of sparsify.rescale_l1 on a
        whole tensor (and mergekit's): both sums rounded to the compute dtype, their ratio taken
        and rounded in it. The exact ratio would differ from it by up to half a bf16 ulp, which
        flips TIES's sign election wherever the weighted task vectors nearly cancel."""
        dtype = self._dtype or torch.float32
        total = torch.tensor(float(self.high_l1.sum()), dtype=torch.float64).to(dtype)
        kept_l1 = torch.tensor(kept, dtype=torch.float64).to(dtype)
        return float(total / kept_l1) if total >= 1e-7 and kept_l1 >= 1e-7 else 1.0


def select_magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Zero all but the int(density * numel) largest |delta| (at least one) of a whole tensor, in
    linear time; ties at the threshold are kept in index order."""
    flat = delta.reshape(-1)
    return _whole(MagnitudeSelect(flat.numel(), density, rescale), flat).apply(flat).reshape(delta.shape)


def _whole(sel: MagnitudeSelect, flat: torch.Tensor) -> MagnitudeMask:
    """`sel`'s mask over one whole flat tensor (every pass over it at once)."""
    sel.first_pass(flat)
    sel.second_pass(flat)
    return sel.mask()


_MAX_FINITE = 0x7F7FFFFF


def smallest(values: torch.Tensor, m: int) -> torch.Tensor:
    """A boolean mask of the `m` smallest of non-negative float32 `values` in a stable ascending
    order (ties in index order), in linear time: the bit patterns are reversed (max finite minus
    the pattern, infinities and NaN first clamped to the largest finite value), so the m
    smallest become the m largest, which the radix selection finds."""
    bits = values.reshape(-1).contiguous().view(torch.int32).clamp(max=_MAX_FINITE)
    flipped = (_MAX_FINITE - bits).view(torch.float32)
    return _whole(MagnitudeSelect(flipped.numel(), 0.0, False, count=m), flipped).keep(flipped)
