"""The vocabulary rows that models of different vocabulary sizes share.

A fine-tune that adds tokens (a chat template's) or pads its embedding to a multiple of 64 keeps
its base's token ids and appends rows. Such models are compared, and labelled, on the leading
ids they share: every model has a row for them and every tokenizer maps each to the same token.
Rows past a tokenizer's last id (padding) are never shared. Vocabularies that disagree on a
shared id are refused by that id: comparing their rows by position would compare different
tokens (`merge` handles them with `tokenizer_source`). Only config and tokenizer files are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from simmerge_ray.errors import CheckpointError
from simmerge_ray.features.module_groups import is_vocabulary_name
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.checkpoint_files import read_config


@dataclass(frozen=True)
class SharedVocab:
    """`rows` leading ids shared by checkpoints whose config vocab sizes (`sizes`) differ."""

    rows: int
    sizes: tuple[int, ...]  # config.json vocab_size per checkpoint, in the order given

    def is_vocab_tensor(self, index: int, tensor: str, shape: Sequence[int]) -> bool:
        """An embedding or output head with one row per token of checkpoint `index`."""
        return bool(shape) and shape[0] == self.sizes[index] and is_vocabulary_name(tensor)

    def shape(self, index: int, tensor: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape compared: a vocabulary tensor's first `rows` rows, any other tensor whole."""
        shape = tuple(shape)
        return (self.rows, *shape[1:]) if self.is_vocab_tensor(index, tensor, shape) else shape


def config_vocab_size(config: dict) -> int | None:
    size = config.get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _tokens_by_id(name: str, ck: Checkpoint) -> list[str | None]:
    from simmerge_ray.probes.errors import ProbeError
    from simmerge_ray.probes.tokenize import has_tokenizer, load_tokenizer

    if not has_tokenizer(ck.path):
        raise CheckpointError(f"model {name!r} ({ck.path}): its vocab_size ({config_vocab_size(ck.config)}) differs from "
                              f"the other models' and it has no tokenizer files, so the ids it shares with them "
                              f"cannot be checked to name the same tokens")
    try:
        vocab = load_tokenizer(ck.path).get_vocab()
    except ProbeError as e:
        raise CheckpointError(str(e)) from None
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out


def _json_tokens(text: bytes) -> list[str | None] | None:
    """Token by id from a tokenizer.json's text (model vocabulary and added tokens), read as
    JSON: no tokenizer library, so a merge still never imports torch; None when unreadable."""
    import json

    try:
        raw = json.loads(text)
        vocab = raw["model"]["vocab"]
        pairs = (list(vocab.items()) if isinstance(vocab, dict) else [(p[0], i) for i, p in enumerate(vocab)])
        pairs += [(t["content"], t["id"]) for t in raw.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    out: list[str | None] = [None] * (max((i for _, i in pairs if isinstance(i, int)), default=-1) + 1)
    for token, i in pairs:
        if isinstance(i, int) and i >= 0:
            out[i] = token
    return out


def remapped_ids(names: Sequence[str], ckpts: Sequence[Checkpoint],
                 shown: Mapping[str, str] | None = None) -> str | None:
    """Where models of one vocabulary size ship tokenizers that map ids to different tokens, a
    sentence naming the first pair and id (their rows are merged id by id: right for a reserved
    token a chat fine-tune renamed, wrong for a reordered vocabulary); None when they agree or
    cannot be read this cheaply (identical tokenizer.json files are not parsed). `shown`: what
    names a model instead of its folder (an earlier merge's, a temporary folder gone after the run)."""
    shipped = [(n, ck, text) for n, ck in zip(names, ckpts) if (text := ck.tokenizer_json()) is not None]
    if len(shipped) < 2 or len({config_vocab_size(ck.config) for _, ck, _ in shipped}) > 1:
        return None
    (first, ref_ck, ref_bytes), ref = shipped[0], None
    for name, ck, text in shipped[1:]:
        if text == ref_bytes:
            continue
        ref = ref if ref is not None else _json_tokens(ref_bytes)
        tokens = _json_tokens(text)
        if ref is None or tokens is None:
            return None
        differ = [i for i in range(min(len(ref), len(tokens))) if ref[i] != tokens[i]]
        if differ:
            i = differ[0]
            where = shown or {}
            return (f"models {first!r} ({where.get(first, ref_ck.path)}) and {name!r} ({where.get(name, ck.path)}) "
                    f"map {len(differ)} token id(s) to different tokens (first: id {i}, {ref[i]!r} and "
                    f"{tokens[i]!r}); their embedding rows are merged id by id (set tokenizer_source to merge them "
                    "token by token)")
    return None


def output_tokenizer(paths: Sequence[str | Path]) -> dict[str, str]:
    """The tokenizer setting of a merge of these folders (a plan's models and base): `union`
    (every model's tokens, so a chat fine-tune's added tokens survive) when their vocabulary
    sizes differ, which the engine would refuse without one; else none. Reads only their configs:
    a plan file may be written before its models' weights are in place."""
    sizes = {config_vocab_size(read_config(Path(p))) for p in paths}
    return {"tokenizer_source": "union"} if len(sizes) > 1 else {}


def shared_vocab(names: Sequence[str], ckpts: Sequence[Checkpoint]) -> SharedVocab | None:
    """None when every checkpoint has the same vocab_size (compared whole, as before); else the
    ids they share, checked against their tokenizers."""
    sizes = [config_vocab_size(ck.config) for ck in ckpts]
    if len(set(sizes)) <= 1:
        return None
    for name, ck, size in zip(names, ckpts, sizes):
        if size is None:
            if not ck.path.is_dir():
                where = f"{ck.path}: a lone file, without config.json"
            else:  # the file named may not be there: say so, not only "no vocab_size"
                where = ck.path / "config.json" if (ck.path / "config.json").exists() else f"{ck.path}: no config.json"
            stated = sorted({s for s in sizes if s is not None})
            beside = ("and the other models' differ" if len(stated) > 1 else
                      f"beside models that state one ({stated[0]})")  # not "differ": they may all agree
            raise CheckpointError(f"model {name!r} ({where}): no vocab_size, {beside}; cannot tell which rows are its "
                                  f"vocabulary")
    tokens = [_tokens_by_id(name, ck) for name, ck in zip(names, ckpts)]
    rows = min(min(size, len(t)) for size, t in zip(sizes, tokens))
    ref = tokens[0][:rows]
    for name, ck, t in zip(names[1:], ckpts[1:], tokens[1:]):
        if t[:rows] != ref:
            i = next(i for i in range(rows) if t[i] != ref[i])
            raise CheckpointError(
                f"models {names[0]!r} ({ckpts[0].path}) and {name!r} ({ck.path}) map token id {i} to {ref[i]!r} "
                f"and {t[i]!r}: neither vocabulary extends the other, so their embedding rows cannot be "
                f"compared id by id (merge them with tokenizer_source: union)")
    return SharedVocab(rows, tuple(s for s in sizes if s is not None))
