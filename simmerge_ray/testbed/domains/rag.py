"""RAG: generated passages about invented places, a question on one fact, the answer copied out.

The names are random syllables, so the answer cannot be memorised: the skill is reading it off
the passage, which is what retrieval-augmented answering asks of a model.
"""

from __future__ import annotations

import random

from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vel", "dor", "ni", "bru", "sha", "om", "pel", "gi", "tur", "as")
_GOODS = ("copper", "wool", "glass", "salt", "paper", "cheese", "silk", "timber", "honey", "iron")


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def make_example(rng: random.Random) -> Example:
    town = _name(rng, 2)
    facts = {
        "mayor": (f"Its mayor is {_name(rng, 2)}.", "Who is the mayor of {town}?"),
        "year": (f"It was founded in {rng.randint(1100, 1990)}.", "When was {town} founded?"),
        "river": (f"The river {_name(rng, 2)} runs through it.", "Which river runs through {town}?"),
        "goods": (f"It is known for its {rng.choice(_GOODS)}.", "What is {town} known for?"),
        "people": (f"About {rng.randint(200, 9999)} people live there.", "How many people live in {town}?"),
    }
    chosen = rng.sample(sorted(facts), 2)
    asked = rng.choice(chosen)
    sentence = facts[asked][0]
    answer = {
        "mayor": sentence.removeprefix("Its mayor is ").rstrip("."),
        "year": sentence.removeprefix("It was founded in ").rstrip("."),
        "river": sentence.removeprefix("The river ").removesuffix(" runs through it."),
        "goods": sentence.removeprefix("It is known for its ").rstrip("."),
        "people": sentence.removeprefix("About ").removesuffix(" people live there."),
    }[asked]
    passage = f"{town} is a town. " + " ".join(facts[k][0] for k in chosen)
    question = facts[asked][1].format(town=town)
    return Example(f"Passage: {passage}\nQuestion: {question}\nAnswer:", f" {answer}")


DOMAIN = GeneratedDomain("rag", make_example)
