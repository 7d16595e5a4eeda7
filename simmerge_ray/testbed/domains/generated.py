"""Shared plumbing for domains whose items are drawn from a seeded generator (math, RAG, instruct)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from simmerge_ray.testbed.domains.base import Example, Split, in_subset, split_of

Maker = Callable[[random.Random], Example]


class GeneratedDomain:
    """A domain defined by one example generator; the item key is the example's full text."""

    def __init__(self, name: str, make: Maker) -> None:
        self.name = name
        self._make = make

    def _stream(self, split: Split, seed: int, subset: tuple[int, int] | None) -> Iterator[Example]:
        rng = random.Random(f"{self.name}|{split}|{seed}")
        seen: set[str] = set()
        while True:
            ex = self._make(rng)
            key = ex.text
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
