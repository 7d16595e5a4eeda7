"""Tokenise probes with a model's tokenizer, truncating to a maximum length.

The digest of a tokenised probe set covers the token ids themselves, so it changes when either
the probe text or the tokenizer changes, and it is what probe-output caches are keyed by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.errors import first_line
from simmerge_ray.probes.errors import ProbeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TokenizedProbes:
    """Token ids per probe (already truncated) and how many probes were cut."""

    ids: tuple[tuple[int, ...], ...]
    truncated: int
    max_length: int

    @property
    def num_probes(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.ids)

    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for probe in self.ids:
            h.update(json.dumps(probe).encode())
            h.update(b"\n")
        return h.hexdigest()


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json")


def tokenizer_failure(folder: str | Path, error: Exception) -> str:
    """Why a tokenizer folder did not load, in one line: the file that is not valid JSON where one
    is (transformers' message gives a decoder's position but not the file), else the error's type
    and first line."""
    for name in _JSON_FILES:
        path = Path(folder) / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as e:
                return f"{path} is not valid JSON: {e}"
    first = first_line(error, fallback="")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model folder (local files only, never the hub)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not has_tokenizer(folder):
        raise ProbeError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/JSON errors for broken files
        raise ProbeError(f"{folder}: cannot load tokenizer ({tokenizer_failure(folder, e)})") from None


def vocabulary_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of the token -> id map (what makes two models' distributions comparable)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.blake2b(json.dumps(vocab).encode(), digest_size=16).hexdigest()


def tokenize_probes(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, *, source: str = "probes") -> TokenizedProbes:
    """Token ids per probe, with the tokenizer's special tokens, cut to `max_length`."""
    if max_length < 1:
        raise ProbeError(f"{source}: max_length must be at least 1, got {max_length}")
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    ids: list[tuple[int, ...]] = []
    truncated = 0
    for i, seq in enumerate(encoded):
        if not seq:
            raise ProbeError(f"{source}: probe {i} tokenises to no tokens")
        if len(seq) > max_length:
            truncated += 1
            seq = seq[:max_length]
        ids.append(tuple(int(t) for t in seq))
    return TokenizedProbes(tuple(ids), truncated, max_length)
