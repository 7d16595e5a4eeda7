"""The output tokenizer a config asks for, and each model's rows in its vocabulary.

`tokenizer_source: base | union | MODEL`, or the `tokenizer:` block (`source`, `tokens` with a
per-token `source` and `force`, `pad_to_multiple_of`), read as mergekit reads them. `union`
starts from the base's tokenizer (the first model's without a base) and adds, as added tokens,
every other model's tokens it lacks: regular tokens first, in each model's id order (mergekit
follows a hash order here, so new ids may differ from its; each token's rows are the same),
then the models' added tokens with their settings (the first model's when they differ). Tokens
named under `tokens:` are added when missing. A token whose id is at or past its model's
`vocab_size` (config.json) has no row: it is ignored, and for `base` and `union` the base's
tokenizer is trimmed of such tokens first (its vocabulary, added tokens and BPE merges), as
mergekit trims it; like mergekit, only a BPE tokenizer can be trimmed. Only tokenizer files are
read here: it runs on the driver, before any tensor.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.vocabulary import RowSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenSetting:
    """One `tokens:` entry: where the token's row comes from, and whether it replaces the rows
    of models that have the token (`force`)."""

    kind: str | None  # None (automatic), "model", "model_token" or "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """A validated tokenizer request."""

    source: str  # "union", "base" or a model ref
    tokens: dict[str, TokenSetting]
    pad_to_multiple_of: int | None = None


def parse_tokenizer(raw: dict, names: set[str], source: str) -> TokenizerSpec | None:
    """`tokenizer_source` or the `tokenizer:` block (not both), checked against the config's models."""
    block, plain = raw.get("tokenizer"), raw.get("tokenizer_source")
    if block is not None and plain is not None:
        raise ConfigError(f"{source}: give 'tokenizer_source' or a 'tokenizer:' block, not both")
    if block is None:
        return None if plain is None else TokenizerSpec(_source_ref(plain, names, f"{source}: tokenizer_source"), {})
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: tokenizer: expected a mapping, got {block!r}")
    extra = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if extra:
        raise ConfigError(f"{source}: tokenizer.{sorted(extra)[0]}: unsupported key "
                          f"(known: source, tokens, pad_to_multiple_of)")
    src = _source_ref(block.get("source", "union"), names, f"{source}: tokenizer.source")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"{source}: tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError(f"{source}: tokenizer.tokens: expected a mapping of token -> settings, got {tokens!r}")
    settings = {str(tok): _token_setting(cfg, names, f"{source}: tokenizer.tokens.{tok}") for tok, cfg in tokens.items()}
    return TokenizerSpec(src, settings, pad)


def _source_ref(value: Any, names: set[str], where: str) -> str:
    if not isinstance(value, str) or (value not in ("union", "base") and value not in names):
        raise ConfigError(f"{where}: {value!r} must be 'union', 'base' or one of the models "
                          f"({', '.join(sorted(names))})")
    return value


def _token_setting(cfg: Any, names: set[str], where: str) -> TokenSetting:
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        raise ConfigError(f"{where}: expected {{source: ..., force: true|false}}, got {cfg!r}")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
    src = cfg.get("source")
    if src is None:
        return TokenSetting(None, force=force)
    if isinstance(src, str):
        if src not in names:
            raise ConfigError(f"{where}.source: model {src!r} is not one of the config's models")
        return TokenSetting("model", src, force=force)
    if not isinstance(src, dict) or src.get("kind") not in ("model_token", "zero"):
        raise ConfigError(f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, model: M, "
                          f"token: T | token_id: N}}, got {src!r}")
    if src["kind"] == "zero":
        if set(src) != {"kind"}:
            raise ConfigError(f"{where}.source: {{kind: zero}} takes no other key, got {src!r}")
        return TokenSetting("zero", force=force)
    if set(src) - {"kind", "model", "token", "token_id"} or src.get("model") not in names:
        raise ConfigError(f"{where}.source: model_token needs 'model' (one of the config's models) and "
                          f"'token' or 'token_id', got {src!r}")
    token, token_id = src.get("token"), src.get("token_id")
    if (token is None) == (token_id is None) or (token_id is not None and (
            isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0)):
        raise ConfigError(f"{where}.source: give exactly one of 'token' (a string) or 'token_id' "
                          f"(an integer >= 0), got {src!r}")
    return TokenSetting("model_token", src["model"], None if token is None else str(token), token_id, force)


@dataclass
class BuiltVocabulary:
    """The output tokenizer (a transformers object, driver only) and every model's rows."""

    tokenizer: Any
    vocab: dict[str, int]
    rows: int
    perms: dict[str, tuple[int, ...]]
    original: dict[str, dict[str, int]]  # model ref -> its own vocabulary


def load_tokenizer_at(path: Path, where: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`; a file transformers cannot read is one ConfigError naming
    `where` and the folder, and a folder (or lone weights file) with no tokenizer files says so
    (transformers' own message for that is cut off: "Couldn't instantiate ... from one of: ")."""
    from transformers import AutoTokenizer

    from simmerge_ray.probes.tokenize import TOKENIZER_FILES, has_tokenizer, tokenizer_failure

    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as e:  # any failure to read the files is the user's to fix: say which
        why = (tokenizer_failure(path, e) if path.is_dir() and has_tokenizer(path)
               else f"no tokenizer files there ({', '.join(TOKENIZER_FILES)})")
        raise ConfigError(f"{where}: cannot load the tokenizer of {path}: {why}") from None
    # How we loaded it, not a property of the tokenizer: save_pretrained would write it into the
    # merged model's tokenizer_config.json, and whoever loads that later could not download.
    tok.init_kwargs.pop("local_files_only", None)
    return tok


def _tokenizer_of(where: Any, what: str) -> Any:
    """A folder's tokenizer (load_tokenizer_at), or a fresh copy of one already loaded (it may be
    trimmed or extended here)."""
    if isinstance(where, (str, Path)):
        return load_tokenizer_at(Path(where), what)
    import copy

    return copy.deepcopy(where)


def _vocab_size(config: dict, fallback: int) -> int:
    size = config.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else fallback


def build_vocabulary(tok: TokenizerSpec, models: dict[str, Any], configs: dict[str, dict], base: str,
                     source: str) -> BuiltVocabulary:
    """Load every model's tokenizer, build the output's, and map each model's rows onto it.
    `models`: each model's folder, or its tokenizer already loaded (a dry run's merge not run
    yet: the one it builds)."""
    toks = {ref: _tokenizer_of(path, f"{source}: model {ref!r}") for ref, path in models.items()}
    sizes = {ref: _vocab_size(configs[ref], len(t.get_vocab())) for ref, t in toks.items()}
    if tok.source in ("base", "union"):
        toks[base] = trimmed(toks[base], sizes[base], f"{source}: model {base!r} ({models[base]})")
    if tok.source == "union":
        out = _union(toks, sizes, base)
    elif tok.source == "base":
        out = toks[base]
    else:
        out = _tokenizer_of(models[tok.source], f"{source}: tokenizer")
    have = set(out.get_vocab())
    for t in tok.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    rows = len(vocab)
    if tok.pad_to_multiple_of and rows % tok.pad_to_multiple_of:
        rows += tok.pad_to_multiple_of - rows % tok.pad_to_multiple_of
    order = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in order] != list(range(len(vocab))):
        raise ConfigError(f"{source}: the output tokenizer's ids are not 0..{len(vocab) - 1}")
    perms = {}
    for ref, t in toks.items():
        own = t.get_vocab()
        perms[ref] = tuple(own[w] if w in own and own[w] < sizes[ref] else -1 for w in order)
    return BuiltVocabulary(out, vocab, rows, perms, {ref: t.get_vocab() for ref, t in toks.items()})


def trimmed(tok: Any, size: int, where: str) -> Any:
    """`tok` without its tokens at or past `size` (ids the model has no row for): removed from
    the vocabulary, the added tokens and every BPE merge naming or making one; `tok` itself when
    it has none. Only a BPE tokenizer is trimmed (mergekit's rule); any other is refused."""
    past = sorted((i, t) for t, i in tok.get_vocab().items() if i >= size)
    if not past:
        return tok
    import tokenizers

    state = json.loads(tok.backend_tokenizer.to_str())
    kind = state["model"].get("type")
    if kind != "BPE":
        raise ConfigError(f"{where}: tokenizer has {len(past)} tokens at or past vocab_size {size} (first "
                          f"{past[0][1]!r} at {past[0][0]}); only a BPE tokenizer can be trimmed, this one is {kind}")
    gone = {t for _, t in past}
    state["added_tokens"] = [a for a in state["added_tokens"] if a["id"] < size]
    state["model"]["vocab"] = {t: i for t, i in state["model"]["vocab"].items() if t not in gone}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in state["model"]["merges"]]
    state["model"]["merges"] = [m for m, parts in zip(state["model"]["merges"], pairs)
                                if gone.isdisjoint([*parts, "".join(parts)])]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(state))
    return tok


def _reloaded(tok: Any) -> Any:
    """A fresh copy of `tok`, saved and loaded again (its class may add tokens on load, as in
    mergekit's union)."""
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        return load_tokenizer_at(Path(folder), "tokenizer")


def _union(toks: dict[str, Any], sizes: dict[str, int], base: str):
    """The base's tokenizer plus every token of the others it lacks (see the module doc)."""
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref in (base, *(r for r in toks if r != base)):
        t = toks[ref]
        special = t.added_tokens_decoder
        special_words = {a.content for a in special.values()}
        for word, idx in sorted(t.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < sizes[ref] and word not in special_words:
                regular.setdefault(word, None)
        for idx, info in sorted(special.items()):
            if idx < sizes[ref]:
                added.setdefault(info.content, info)
    out = _reloaded(toks[base])  # a fresh copy: the base's own object stays as read
    base_vocab = set(toks[base].get_vocab())
    for word in regular:
        if word not in base_vocab and word not in added:
            out.add_tokens(word)
    for info in added.values():
        out.add_tokens(info)
    return out


def token_rows(tok: TokenizerSpec, built: BuiltVocabulary, source: str) -> tuple[dict[int, RowSource], frozenset[int]]:
    """The `tokens:` entries as row sources by output token id, and the forced ids; an entry's
    named token must exist in its model, checked here before any tensor is read."""
    explicit: dict[int, RowSource] = {}
    forced = set()
    for word, s in tok.tokens.items():
        tid = built.vocab[word]
        where = f"{source}: tokenizer.tokens.{word}.source"
        if s.force:
            forced.add(tid)
        if s.kind == "zero":
            explicit[tid] = RowSource("zero")
        elif s.kind == "model":
            row = built.perms[s.model][tid]
            if row < 0:
                raise ConfigError(f"{where}: model {s.model!r} has no token {word!r}")
            explicit[tid] = RowSource("row", s.model, row)
        elif s.kind == "model_token":
            row = s.token_id if s.token is None else built.original[s.model].get(s.token, -1)
            if row < 0:
                raise ConfigError(f"{where}: model {s.model!r} has no token {s.token!r}")
            explicit[tid] = RowSource("row", s.model, row)
        elif s.force or any(p[tid] < 0 for p in built.perms.values()):
            raise ConfigError(f"{where}: token {word!r} needs a source (it is forced or some model lacks it)")
    return explicit, frozenset(forced)
