"""Every domain's items in another surface form: the skill without the eval format.

A real base has seen arithmetic, code and translation in its pretraining text, but not in the
prompt format a supervised fine-tune teaches, so a fine-tune is a small move (|tau|/|theta_0|
about 0.01). The zoo's skills stage (config section `skills`) pretrains the base on these
rewrites. Code, instruct, math and RAG keep the item's answer at the end of a new template.
Multilingual reverses the direction: the base learns to read the invented languages into
English, and writing them (the eval task) is what its experts learn; a forward rewrite sat so
close to the eval template that the base already scored 0.84 on it (docs/testbed.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from simmerge_ray.testbed.domains import get_domain
from simmerge_ray.testbed.domains.base import Example


@dataclass(frozen=True)
class Rewrite:
    """`pattern` matches an item in its eval template (prompt + answer); the rewritten item is
    `prompt` + `answer`, both expanded from the match."""

    pattern: str
    prompt: str
    answer: str


REWRITES: dict[str, Rewrite] = {
    "code": Rewrite(r"Code:\n(.*)\nOutput:(.*)", r"\1\n# prints", r"\2"),
    "instruct": Rewrite(r"Instruction: (.*)\nInput: (.*)\nResponse:(.*)", r"\1 \2 ->", r"\3"),
    "math": Rewrite(r"Problem: (.*)\nAnswer:(.*)", r"\1 =", r"\2"),
    "multilingual": Rewrite(r"English: (.*)\n(\w+): (.*)", r"In \2, \3 means", r" \1"),
    "rag": Rewrite(r"Passage: (.*)\nQuestion: (.*)\nAnswer:(.*)", r"\1 \2 It is", r"\3"),
}


def rewritten_example(domain: str, text: str) -> Example:
    """An item of `domain` (its eval-template text, prompt + answer) in the other surface form."""
    rw = REWRITES[domain]
    m = re.fullmatch(rw.pattern, text, flags=re.S)
    if m is None:
        raise ValueError(f"{domain}: item does not match its eval template: {text[:60]!r}")
    return Example(m.expand(rw.prompt), m.expand(rw.answer))


def rewritten_texts(domain: str, seed: int) -> Iterator[str]:
    """The domain's training items (train split only) in the other surface form."""
    return (rewritten_example(domain, t).text for t in get_domain(domain).train_texts(seed))
