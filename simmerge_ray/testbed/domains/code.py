"""Code: Python source of the standard library of the running interpreter (the modules at the top
of its Lib directory).

Files are split by path between train, probe and eval; an eval example is a few lines of a
held-out file as the prompt and the next line as the answer.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.domains.base import Example, Split, in_subset, split_of

CHUNK_CHARS = 1200
CONTEXT_LINES = 4
MAX_PROMPT_CHARS = 160


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def _files() -> tuple[tuple[str, str], ...]:
    """(file name, source) of every top-level stdlib module, sorted, read once per process."""
    root = stdlib_dir()
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            out.append((path.name, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if not out:
        raise ConfigError(f"{root}: no Python standard-library sources found for the code domain")
    return tuple(out)


def _chunks(source: str) -> list[str]:
    """Cut a file at line boundaries into pieces of about CHUNK_CHARS."""
    pieces, cur, size = [], [], 0
    for line in source.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            pieces.append("".join(cur))
            cur, size = [], 0
    if cur:
        pieces.append("".join(cur))
    return pieces


class CodeDomain:
    name = "code"

    def train_texts(self, seed: int, subset: tuple[int, int] | None = None) -> Iterator[str]:
        docs = [c for rel, src in _files() if split_of(rel) == "train" and in_subset(rel, subset) for c in _chunks(src)]
        rng = random.Random(f"code|train|{seed}")
        while True:
            rng.shuffle(docs)
            yield from docs

    def examples(self, split: Split, seed: int) -> Iterator[Example]:
        rng = random.Random(f"code|{split}|{seed}")
        held = [src.splitlines() for rel, src in _files() if split_of(rel) == split]
        candidates = [
            (f, i) for f, lines in enumerate(held) for i in range(CONTEXT_LINES, len(lines))
            if 10 <= len(lines[i].strip()) <= 60 and not lines[i].strip().startswith("#")
        ]
        rng.shuffle(candidates)
        for f, i in candidates:
            lines = held[f]
            yield Example(("\n".join(lines[i - CONTEXT_LINES:i]) + "\n")[-MAX_PROMPT_CHARS:], lines[i])


DOMAIN = CodeDomain()
