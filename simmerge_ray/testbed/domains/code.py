"""Code: predict what a short generated Python snippet prints.

The base pretrains on real Python (the running interpreter's standard library, see
`stdlib_documents`, part of the general text), so it knows the language; the code task, like a
code-execution fine-tuning set, asks for the exact output of a snippet: list and string methods,
arithmetic on variables, small functions. Answers are exact, so a small model can learn them
and accuracy separates an expert from the base.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.domains.base import Example
from simmerge_ray.testbed.domains.generated import GeneratedDomain

CHUNK_CHARS = 1200
_NAMES = ("x", "y", "n", "a", "b", "items", "word", "total", "data", "vals")
_WORDS = ("cat", "sun", "map", "red", "pen", "box", "car", "tea", "owl", "fig", "ink", "jam")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def stdlib_documents() -> tuple[str, ...]:
    """Chunks of about CHUNK_CHARS (cut at line ends) of every top-level stdlib module, sorted."""
    root = stdlib_dir()
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        cur: list[str] = []
        size = 0
        for line in source.splitlines(keepends=True):
            cur.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                docs.append("".join(cur))
                cur, size = [], 0
        if cur:
            docs.append("".join(cur))
    if not docs:
        raise ConfigError(f"{root}: no Python standard-library sources found for the general text")
    return tuple(docs)


def _list(rng: random.Random) -> list[int]:
    return [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]


def _snippets() -> list[Callable[[random.Random], tuple[str, str]]]:
    """Generators of (code, printed output); each is checked by running it (see the tests)."""

    def arith(rng: random.Random) -> tuple[str, str]:
        v, a, b = rng.choice(_NAMES), rng.randint(1, 30), rng.randint(1, 9)
        op = rng.choice(("+=", "-=", "*="))
        out = {"+=": a + b, "-=": a - b, "*=": a * b}[op]
        return f"{v} = {a}\n{v} {op} {b}\nprint({v})", str(out)

    def length(rng: random.Random) -> tuple[str, str]:
        v, xs = rng.choice(_NAMES), _list(rng)
        return f"{v} = {xs}\nprint(len({v}))", str(len(xs))

    def index(rng: random.Random) -> tuple[str, str]:
        v, xs = rng.choice(_NAMES), _list(rng)
        i = rng.choice((0, 1, -1))
        return f"{v} = {xs}\nprint({v}[{i}])", str(xs[i])

    def sort(rng: random.Random) -> tuple[str, str]:
        v, xs = rng.choice(_NAMES), _list(rng)
        return f"{v} = {xs}\nprint(sorted({v}))", str(sorted(xs))

    def agg(rng: random.Random) -> tuple[str, str]:
        v, xs = rng.choice(_NAMES), _list(rng)
        fn = rng.choice(("max", "min", "sum"))
        return f"{v} = {xs}\nprint({fn}({v}))", str({"max": max, "min": min, "sum": sum}[fn](xs))

    def append(rng: random.Random) -> tuple[str, str]:
        v, xs, e = rng.choice(_NAMES), _list(rng)[:3], rng.randint(0, 20)
        return f"{v} = {xs}\n{v}.append({e})\nprint({v})", str(xs + [e])

    def upper(rng: random.Random) -> tuple[str, str]:
        v, w = rng.choice(_NAMES), rng.choice(_WORDS)
        fn = rng.choice(("upper", "title"))
        return f"{v} = '{w}'\nprint({v}.{fn}())", getattr(w, fn)()

    def reverse(rng: random.Random) -> tuple[str, str]:
        v, w = rng.choice(_NAMES), rng.choice(_WORDS) + rng.choice(_WORDS)
        return f"{v} = '{w}'\nprint({v}[::-1])", w[::-1]

    def join(rng: random.Random) -> tuple[str, str]:
        v, ws, sep = rng.choice(_NAMES), rng.sample(_WORDS, 3), rng.choice(("-", ", ", "+"))
        return f"{v} = {ws}\nprint('{sep}'.join({v}))", sep.join(ws)

    def func(rng: random.Random) -> tuple[str, str]:
        k, c, arg = rng.randint(2, 5), rng.randint(0, 9), rng.randint(1, 9)
        return f"def f(v):\n    return v * {k} + {c}\nprint(f({arg}))", str(arg * k + c)

    return [arith, length, index, sort, agg, append, upper, reverse, join, func]


_MAKERS = _snippets()


def make_example(rng: random.Random) -> Example:
    code, out = rng.choice(_MAKERS)(rng)
    return Example(f"Code:\n{code}\nOutput:", f" {out}")


DOMAIN = GeneratedDomain("code", make_example)
