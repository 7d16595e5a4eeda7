"""Shared plumbing for domains whose items are drawn from a seeded generator (math, RAG, instruct)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from simmerge_ray.testbed.domains.base import Example, Split, in_subset, split_of

Maker = Callable[[random.Random], Example]
Key = Callable[[Example], str]


class GeneratedDomain:
    """A domain defined by one example generator; the item key (what the split hashes) is the
    example's full text unless `key` says otherwise."""

    def __init__(self, name: str, make: Maker, key: Key = lambda ex: ex.text) -> None:
        self.name = name
        self._make = make
        self._key = key

    def _stream(self, split: Split, seed: int, subset: tuple[int, int] | None) -> Iterator[Example]:
        rng = random.Random(f"{self.name}|{split}|{seed}")
        seen: set[str] = set()
        while True:
            ex = self._make(rng)
            key = self._key(ex)
            if split_of(key) != split or (split == "train" and not in_subset(key, subset)):
                continue
            if split != "train":  # held-out sets have no duplicates
                if key in seen:
                    continue
                seen.add(key)
            yield ex

    def train_texts(self, seed: int, subset: tuple[int, int] | None = None) -> Iterator[str]:
        return (ex.text for ex in self._stream("train", seed, subset))

    def examples(self, split: Split, seed: int) -> Iterator[Example]:
        return self._stream(split, seed, None)
