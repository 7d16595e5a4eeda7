"""The small files that travel with a checkpoint's weights: tokenizer and generation config."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def has_loadable_tokenizer(folder: Path) -> bool:
    """A tokenizer transformers loads from the folder alone: its config and a vocabulary (a fast
    tokenizer's tokenizer.json, SentencePiece's tokenizer.model, or an older BPE's vocab.json)."""
    return (folder / "tokenizer_config.json").is_file() and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def copy_tokenizer(src: Path, out: Path) -> None:
    for fname in TOKENIZER_FILES:
        if (src / fname).exists():
            shutil.copy2(src / fname, out / fname)


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer files and generation_config.json, when present in `src`."""
    copy_tokenizer(src, out)
    if (src / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
