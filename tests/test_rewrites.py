"""The skills stage's rewrites (testbed/domains/rewrites.py): every domain's items, train and
eval, match their template and change their surface form, so the skills stage's text carries
the skill without the eval format; four domains keep the answer, multilingual reverses it."""

from __future__ import annotations

import itertools

import pytest

from simmerge_ray.testbed.domains import DOMAINS
from simmerge_ray.testbed.domains.rewrites import REWRITES, rewritten_example, rewritten_texts


def test_every_domain_has_a_rewrite() -> None:
    assert set(REWRITES) == set(DOMAINS)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_rewrites_drop_the_template(domain: str) -> None:
    dom = DOMAINS[domain]
    for ex in itertools.islice(dom.examples("eval", 0), 200):
        new = rewritten_example(domain, ex.text)
        if domain == "multilingual":  # reversed: read the invented language into English
            english = ex.prompt.split("\n", 1)[0].removeprefix("English: ")
            assert new.answer == " " + english and ex.answer.strip() in new.prompt
        else:
            assert new.answer == ex.answer
        assert new.text != ex.text
        # the prompt's template words are gone: its first line's label does not survive
        label = ex.prompt.split(":", 1)[0]
        assert not new.prompt.startswith(label + ":"), new.prompt
    texts = list(itertools.islice(rewritten_texts(domain, 3), 50))
    trained = list(itertools.islice(dom.train_texts(3), 50))
    assert texts == [rewritten_example(domain, t).text for t in trained]


def test_an_item_off_its_template_is_named() -> None:
    with pytest.raises(ValueError, match=r"^math: item does not match its eval template"):
        rewritten_example("math", "Question: 1 + 1\nResult: 2")
