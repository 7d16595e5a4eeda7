"""TIES's magnitude top-k over a tensor seen in chunks (pure math, no I/O).

In memory, `sparsify.magnitude` sorts |delta| to keep the k largest. A tensor larger than memory
is seen in chunks instead, so the k-th largest |delta| is found by radix selection on its float32
bits, which order non-negative floats: a first pass counts the top 16 bits of every |delta|, a
second counts the low 16 bits inside the one bucket that holds the k-th value. That gives the
exact threshold and how many values equal to it are kept; ties are kept in index order (the sort
breaks them in an unspecified order, so only ties at the threshold can differ from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BUCKETS = 1 << 16


def _bits(absd: torch.Tensor) -> torch.Tensor:
    return absd.contiguous().view(torch.int32)  # non-negative: bincount takes them as they are


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

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        absd = delta.abs()
        keep = absd > self.value
        if self.ties > 0:
            equal = absd == self.value
            keep |= equal & (equal.cumsum(0) <= self.ties)
            self.ties -= min(self.ties, int(equal.sum()))
        out = delta * keep  # several times faster than torch.where or masked_fill here
        return out.mul_(self.scale) if self.scale != 1.0 else out


class MagnitudeSelect:
    """The mask keeping the k = max(1, int(density * numel)) largest |delta| (as
    `sparsify.magnitude`), built from two passes over the chunks of one flat tensor."""

    def __init__(self, numel: int, density: float, rescale: bool) -> None:
        self.k = max(1, int(density * numel)) if density > 0 and numel else 0
        self.rescale = rescale
        self.high = torch.zeros(BUCKETS, dtype=torch.int64)
        self.low = torch.zeros(BUCKETS, dtype=torch.int64)
        self.high_l1 = torch.zeros(BUCKETS, dtype=torch.float64)  # sum |delta| per top-bits bucket
        self.bucket: int | None = None  # the top-bits bucket holding the k-th value, after pass 1
        self._above = 0  # values in buckets above it

    def first_pass(self, delta: torch.Tensor) -> None:
        absd = delta.abs()
        high = _bits(absd) >> 16
        self.high += torch.bincount(high, minlength=BUCKETS)
        if self.rescale:
            self.high_l1 += torch.bincount(high, weights=absd, minlength=BUCKETS)

    def second_pass(self, delta: torch.Tensor) -> None:
        if self.bucket is None:
            self.bucket, self._above = _split(self.high, self.k)
        bits = _bits(delta.abs())
        inside = bits[(bits >> 16) == self.bucket]
        self.low += torch.bincount(inside & (BUCKETS - 1), minlength=BUCKETS)

    def mask(self) -> MagnitudeMask:
        """The mask, once both passes have seen every chunk."""
        if self.k == 0:
            return MagnitudeMask(float("inf"), 0)
        need = self.k - self._above
        j, above_in = _split(self.low, need)
        bits = torch.tensor([(self.bucket << 16) | j], dtype=torch.int32)
        value = float(bits.view(torch.float32))
        ties = need - above_in
        scale = 1.0
        if self.rescale:
            lows = torch.arange(j + 1, BUCKETS, dtype=torch.int32) | (self.bucket << 16)
            inside_l1 = float((self.low[j + 1:].double() * lows.view(torch.float32).double()).sum())
            kept = float(self.high_l1[self.bucket + 1:].sum()) + inside_l1 + ties * value
            total = float(self.high_l1.sum())
            if total >= 1e-7 and kept >= 1e-7:  # as sparsify.rescale_l1
                scale = total / kept
        return MagnitudeMask(value, ties, scale)
