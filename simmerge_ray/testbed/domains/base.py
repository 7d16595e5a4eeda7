"""What every domain provides, and the deterministic split that keeps eval items out of training.

An item (a source file, a generated problem, a catalog entry) goes to exactly one split, chosen
by a hash of its key, so the held-out evaluation set can never leak into any training stream
whatever the seed or the data subset of a variant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

Split = Literal["train", "probe", "eval"]

# Percent of item keys in each held-out split; the rest trains.
PROBE_PCT = 10
EVAL_PCT = 10


@dataclass(frozen=True)
class Example:
    """A prompt and its reference answer; the answer is what the score reads."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


BUCKETS = 100  # key_bucket's range: a data subset (index, of) deals these out modulo `of`


def key_bucket(key: str, salt: str = "") -> int:
    """A stable number in [0, BUCKETS) for an item key (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def split_of(key: str) -> Split:
    b = key_bucket(key, "split")
    if b < EVAL_PCT:
        return "eval"
    if b < EVAL_PCT + PROBE_PCT:
        return "probe"
    return "train"


def in_subset(key: str, subset: tuple[int, int] | None) -> bool:
    """Whether a training item belongs to data subset (index, of); None keeps everything. Shares
    are exact where `of` divides BUCKETS (a half each for the shipped (i, 2)); of 3: 34/33/33%."""
    if subset is None:
        return True
    index, of = subset
    return key_bucket(key, "subset") % of == index


class Domain(Protocol):
    """A source of training text and of labeled examples for one task."""

    name: str

    def train_texts(self, seed: int, subset: tuple[int, int] | None = None) -> Iterator[str]:
        """An endless stream of training documents from the train split (cycled if finite)."""
        ...

    def examples(self, split: Split, seed: int) -> Iterator[Example]:
        """Labeled examples drawn from `split` ("probe" or "eval"), in a seeded order."""
        ...
