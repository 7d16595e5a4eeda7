"""Math: generated one-step arithmetic, bare or as a word problem, with small integer answers.

Operands stay small (sums and differences within 20, products of the 1-9 table), so the facts
recur across templates and names: an eval problem is unseen as text, but its arithmetic is
learnable from the training problems, as a fine-tune on grade-school arithmetic teaches it.
"""

from __future__ import annotations

import random

from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

_NAMES = ("Mia", "Tom", "Ana", "Ravi", "Lena", "Omar", "Kai", "Sara", "Ivan", "Noor", "Eli", "Zoe")
_THINGS = ("apples", "pencils", "coins", "books", "stamps", "marbles", "cards", "shells")


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{a} * {b}", a * b
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    if op == "-":
        a, b = max(a, b) + 5, min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def _word_problem(rng: random.Random) -> tuple[str, int]:
    who, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        return f"{who} has {a} {thing} and gets {b} more. How many {thing} does {who} have?", a + b
    if kind == 1:
        a = rng.randint(6, 20)
        b = rng.randint(1, min(a - 1, 10))
        return f"{who} has {a} {thing} and gives {b} to {other}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{who} buys {a} bags with {b} {thing} in each. How many {thing} in all?", a * b


def make_example(rng: random.Random) -> Example:
    question, answer = _word_problem(rng) if rng.random() < 0.4 else _arithmetic(rng)
    return Example(f"Problem: {question}\nAnswer:", f" {answer}")


DOMAIN = GeneratedDomain("math", make_example)
