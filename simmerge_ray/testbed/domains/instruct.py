"""Instruction following: generated instructions over short word or number lists, exact responses."""

from __future__ import annotations

import random
from collections.abc import Callable

from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

_WORDS = (
    "red", "blue", "green", "fox", "river", "stone", "light", "cloud", "bread", "lamp", "door", "tree",
    "bird", "road", "glass", "snow", "wind", "fire", "salt", "moon", "ship", "leaf", "horse", "bell",
)

# instruction -> (uses numbers?, response from the input items)
_TASKS: dict[str, tuple[bool, Callable[[list], str]]] = {
    "Reverse the order of the words.": (False, lambda w: " ".join(reversed(w))),
    "Write the words in capital letters.": (False, lambda w: " ".join(w).upper()),
    "Give the first letter of each word.": (False, lambda w: " ".join(x[0] for x in w)),
    "Count the words.": (False, lambda w: str(len(w))),
    "Join the words with commas.": (False, lambda w: ", ".join(w)),
    "Sort the numbers from smallest to largest.": (True, lambda n: " ".join(map(str, sorted(n)))),
    "Give the largest number.": (True, lambda n: str(max(n))),
}


def make_example(rng: random.Random) -> Example:
    instruction = rng.choice(sorted(_TASKS))
    numeric, respond = _TASKS[instruction]
    size = rng.randint(3, 5)
    items = [rng.randint(1, 99) for _ in range(size)] if numeric else rng.sample(_WORDS, size)
    given = " ".join(map(str, items))
    return Example(f"Instruction: {instruction}\nInput: {given}\nResponse:", f" {respond(items)}")


DOMAIN = GeneratedDomain("instruct", make_example)
