"""Math: generated arithmetic and one-step word problems with integer answers."""

from __future__ import annotations

import random

from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

_NAMES = ("Mia", "Tom", "Ana", "Ravi", "Lena", "Omar", "Kai", "Sara", "Ivan", "Noor", "Eli", "Zoe")
_THINGS = ("apples", "pencils", "coins", "books", "stamps", "marbles", "cards", "shells")


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} * {b}", a * b
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def _word_problem(rng: random.Random) -> tuple[str, int]:
    who, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return f"{who} has {a} {thing} and gets {b} more. How many {thing} does {who} have?", a + b
    if kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        return f"{who} has {a} {thing} and gives {b} to {other}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{who} buys {a} bags with {b} {thing} in each. How many {thing} in all?", a * b


def make_example(rng: random.Random) -> Example:
    question, answer = _word_problem(rng) if rng.random() < 0.4 else _arithmetic(rng)
    return Example(f"Problem: {question}\nAnswer:", f" {answer}")


DOMAIN = GeneratedDomain("math", make_example)
