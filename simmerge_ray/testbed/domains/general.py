"""General text for pretraining the base: the help topics shipped with Python (pydoc_data) and the
source of its standard library, so the base knows English prose about Python and Python itself."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache

from simmerge_ray.testbed.domains.code import CHUNK_CHARS, stdlib_documents


@cache
def _documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = topics[name]
        docs.extend(text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS))
    return tuple(docs) + stdlib_documents()


def general_texts(seed: int) -> Iterator[str]:
    docs = list(_documents())
    rng = random.Random(f"general|{seed}")
    while True:
        rng.shuffle(docs)
        yield from docs
