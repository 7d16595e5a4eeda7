"""Multilingual: English -> other-language pairs from the gettext .po catalogs shipped in Django.

Entries are split by their English msgid, so an eval phrase is unseen in every language.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.domains.base import Example, Split, in_subset, split_of

LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese"}
MAX_CHARS = 80


def catalog_root() -> Path:
    spec = importlib.util.find_spec("django")
    if spec is None or spec.origin is None:
        raise ConfigError("multilingual domain: the 'django' package (source of its .po catalogs) is not installed")
    return Path(spec.origin).parent


def _unquote(s: str) -> str:
    body = s.strip()[1:-1]
    return body.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of the singular, translated, non-fuzzy entries of a .po file."""
    pairs: list[tuple[str, str]] = []
    field, msgid, msgstr, fuzzy, plural = None, "", "", False, False

    def flush() -> None:
        if msgid and msgstr and not fuzzy and not plural:
            pairs.append((msgid, msgstr))

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("msgid "):
            field, msgid = "id", _unquote(line[6:])
        elif line.startswith("msgid_plural"):
            plural, field = True, None
        elif line.startswith("msgstr "):
            field, msgstr = "str", _unquote(line[7:])
        elif line.startswith('"') and field is not None:
            if field == "id":
                msgid += _unquote(line)
            else:
                msgstr += _unquote(line)
        elif not line:
            flush()
            field, msgid, msgstr, fuzzy, plural = None, "", "", False, False
    flush()
    return pairs


@cache
def _entries() -> tuple[tuple[str, str, str], ...]:
    """(language code, English, translation) across Django's catalogs, deduplicated and sorted."""
    root = catalog_root()
    found: set[tuple[str, str, str]] = set()
    for lang in LANGUAGES:
        catalogs = [*root.glob(f"conf/locale/{lang}/LC_MESSAGES/*.po"),
                    *root.glob(f"contrib/*/locale/{lang}/LC_MESSAGES/*.po")]
        for po in sorted(catalogs):
            for en, tr in parse_po(po.read_text(encoding="utf-8")):
                if len(en) <= MAX_CHARS and len(tr) <= MAX_CHARS and "\n" not in en + tr:
                    found.add((lang, en, tr))
    if not found:
        raise ConfigError(f"{root}: no .po catalogs found for languages {', '.join(LANGUAGES)}")
    return tuple(sorted(found))


def _example(lang: str, en: str, tr: str) -> Example:
    return Example(f"English: {en}\n{LANGUAGES[lang]}:", f" {tr}")


class MultilingualDomain:
    name = "multilingual"

    def train_texts(self, seed: int, subset: tuple[int, int] | None = None) -> Iterator[str]:
        docs = [_example(*e).text for e in _entries() if split_of(e[1]) == "train" and in_subset(e[1], subset)]
        rng = random.Random(f"multilingual|train|{seed}")
        while True:
            rng.shuffle(docs)
            yield from docs

    def examples(self, split: Split, seed: int) -> Iterator[Example]:
        held = [_example(*e) for e in _entries() if split_of(e[1]) == split]
        random.Random(f"multilingual|{split}|{seed}").shuffle(held)
        yield from held


DOMAIN = MultilingualDomain()
