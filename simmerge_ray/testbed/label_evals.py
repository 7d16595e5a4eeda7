"""The eval sets as `label` scores merges on them: every task's examples encoded by the base's
tokenizer (the driver's pre-Ray check and each evaluator actor encode the same way), and the
digest a label's cache entry is keyed by."""

from __future__ import annotations

from typing import TYPE_CHECKING

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.digest_cache import arrays_digest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from simmerge_ray.testbed.evaluate import EncodedEvalSet


def base_tokenizer(cat: Catalog) -> PreTrainedTokenizerFast:
    """The base's tokenizer, which encodes every eval set: a base without one is one ConfigError
    naming its folder (transformers' own error was a traceback about sentencepiece)."""
    from simmerge_ray.probes.tokenize import TOKENIZER_FILES, has_tokenizer, tokenizer_failure
    from simmerge_ray.testbed.tokenizer import load_tokenizer

    if not has_tokenizer(cat.base):
        raise ConfigError(f"{cat.base}: the catalog's base has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          f"label encodes the eval sets with the base's tokenizer")
    try:
        return load_tokenizer(cat.base)
    except Exception as e:  # transformers raises OSError/ValueError/JSON errors for broken files
        raise ConfigError(f"{cat.base}: cannot load the catalog's base tokenizer ({tokenizer_failure(cat.base, e)})"
                          ) from None


def encoded_evals(cat: Catalog) -> dict[str, EncodedEvalSet]:
    """Every task's eval set as plans are scored on it: tokenised by the base's tokenizer."""
    from simmerge_ray.testbed.evaluate import EVAL_MAX_LEN, encode, load_examples

    tok = base_tokenizer(cat)
    out = {}
    for t, e in sorted(cat.tasks.items()):
        if e.eval is None:
            continue
        try:
            out[t] = encode(load_examples(e.eval), tok, EVAL_MAX_LEN)
        except ConfigError as err:  # encode knows the example, not its file
            msg = str(err)
            raise ConfigError(msg if msg.startswith(str(e.eval)) else f"{e.eval}: {msg} (the base's tokenizer, "
                              f"task {t!r})") from None
    return out


def eval_digest(data: EncodedEvalSet) -> str:
    """What a label's eval side is keyed by: the encoded tokens and answer positions, so that a
    changed tokenizer or length limit measures again (the file's bytes alone did not)."""
    return arrays_digest({"input_ids": data.input_ids.numpy(), "attention_mask": data.attention_mask.numpy(),
                          "target_mask": data.target_mask.numpy()})
