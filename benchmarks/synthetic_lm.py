"""Tiny causal LMs with a locally trained tokenizer, for tests and benchmarks (nothing downloaded).

Weights come from `simmerge_ray.io.synthetic` (seeded, real transformers architectures); the
tokenizer is a WordLevel model trained on generated text and saved beside the weights as
tokenizer.json, so `AutoTokenizer.from_pretrained(folder)` loads it like any real checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

WORDS = ("the cat dog sees a big small red blue runs sleeps eats fish bird tree under over and "
         "then one two three four five plus minus equals code def return if else for in print "
         "list value house river mountain quickly slowly green yellow bright dark old new").split()
SPECIALS = ("[UNK]", "[PAD]", "[BOS]")


def make_corpus(n: int, seed: int = 0, *, min_words: int = 3, max_words: int = 24) -> list[str]:
    """`n` lines of random words from a fixed word list."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def train_tokenizer(texts: list[str], vocab_size: int = 64):
    """A WordLevel tokenizer that prepends [BOS], wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS)))
    bos = tok.token_to_id("[BOS]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def make_tiny_lm(out: Path, tokenizer, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                 seed: int = 0, init_std: float = 0.2, base: Path | None = None, delta_std: float = 0.0,
                 vocab_size: int | None = None, overwrite: bool = False) -> Path:
    """A llama checkpoint (float32) sized to the tokenizer, with the tokenizer saved beside it."""
    spec = SyntheticSpec(architecture="llama", hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=num_heads, vocab_size=vocab_size or len(tokenizer), seed=seed,
                         dtype="float32", init_std=init_std)
    make_checkpoint(Path(out), spec, base=base, delta_std=delta_std, overwrite=overwrite)
    tokenizer.save_pretrained(out)
    return Path(out)
