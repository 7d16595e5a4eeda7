"""The skill-base study's rewrites (benchmarks/skill_base.py): every domain's items, train and
eval, match their template, keep their answer at the end and change their surface form, so the
study's pretraining text carries the skill without the eval format."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.skill_base import REWRITES, rewrite, rewritten_example, rewritten_texts
from simmerge_ray.testbed.domains import DOMAINS
from simmerge_ray.testbed.domains.base import Example


def test_every_domain_has_a_rewrite() -> None:
    assert set(REWRITES) == set(DOMAINS)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_rewrites_keep_the_answer_and_drop_the_template(domain: str) -> None:
    dom = DOMAINS[domain]
    for ex in itertools.islice(dom.examples("eval", 0), 200):
        new = rewritten_example(domain, ex)
        assert new.answer == ex.answer and new.text != ex.text
        # the prompt's template words are gone: its first line's label does not survive
        label = ex.prompt.split(":", 1)[0]
        assert not new.prompt.startswith(label + ":"), new.prompt
    texts = list(itertools.islice(rewritten_texts(domain, 3), 50))
    trained = list(itertools.islice(dom.train_texts(3), 50))
    assert texts == [rewrite(domain, t) for t in trained]


def test_an_item_off_its_template_is_named() -> None:
    with pytest.raises(ValueError, match=r"^math: item does not match its eval template"):
        rewritten_example("math", Example("Question: 1 + 1\nResult:", " 2"))
