"""Models whose vocabularies differ in size, as real catalogs hold them: a fine-tune that added a
chat template's tokens and padded its embedding to a multiple of 8, beside models that kept the
base's vocabulary. Real safetensors folders with real tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import write_checkpoint

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
ADDED = ["<|im_start|>", "<|im_end|>"]


def word_tokenizer(size: int, swap: tuple[int, int] | None = None):
    """A whitespace word-level tokenizer of `size` tokens (ids 0-2 special); `swap` exchanges
    two tokens' ids (a vocabulary that is not an extension of the plain one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(size - 3))]
    if swap:
        i, j = swap
        words[i], words[j] = words[j], words[i]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def extended_copy(src: Path, out: Path, rows: int, seed: int = 0) -> Path:
    """`src` with the chat tokens added to its tokenizer (the plain word tokenizer where it has
    none) and its embedding and head grown to
    `rows` rows (seeded new rows; the old ones unchanged), config vocab_size = rows."""
    from simmerge_ray.probes.tokenize import has_tokenizer, load_tokenizer

    ck = Checkpoint.open(src)
    tok = load_tokenizer(src) if has_tokenizer(src) else word_tokenizer(ck.config["vocab_size"])
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    assert len(tok) <= rows
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ck.entries:
        t = ck.read(name)
        if name in VOCAB_TENSORS:
            extra = torch.randn(rows - t.shape[0], *t.shape[1:], generator=gen).to(t.dtype) * t.float().std().to(t.dtype)
            t = torch.cat([t, extra])
        tensors[name] = t
    write_checkpoint(out, {**ck.config, "vocab_size": rows},
                     [(n, tuple(t.shape), ck.entries[n].dtype, lambda t=t: t) for n, t in tensors.items()], 10**9)
    tok.save_pretrained(out)
    return out


def with_tokenizer(folder: Path, swap: tuple[int, int] | None = None) -> Path:
    """Save the plain word tokenizer of the model's vocab_size into its folder."""
    word_tokenizer(Checkpoint.open(folder).config["vocab_size"], swap).save_pretrained(folder)
    return folder
