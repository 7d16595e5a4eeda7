"""Probe every catalog model on every task's probes, through the cache.

Per (task, model): read the task's probe file, tokenise it with the model's tokenizer (its own
folder, else the catalog base's), key a cache by (model fingerprint, probe digest, settings) and
run only what the cache lacks. Config and tokenizer problems surface here, before any actor
starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from simmerge_ray.catalog import Catalog, ModelEntry
from simmerge_ray.io.architecture import check_config_matches_weights
from simmerge_ray.inference.backend import load_config
from simmerge_ray.inference.cache import ProbeCache, RecordShapes, discard_entries
from simmerge_ray.inference.pipeline import ModelWork, ProbeJob, RunReport, check_probe_actor, run_jobs
from simmerge_ray.inference.settings import ProbeSettings, RunOptions, cache_key
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.shared_vocab import SharedVocab, shared_vocab
from simmerge_ray.probes.errors import ProbeError, VocabularyError
from simmerge_ray.probes.loading import load_probe_texts
from simmerge_ray.probes.tokenize import TokenizedProbes, has_tokenizer, load_tokenizer, tokenize_probes, vocabulary_digest


@dataclass(frozen=True)
class ModelProbes:
    """One model's tokenised probes of one task and the cache that holds its outputs."""

    name: str
    model_dir: Path
    vocab_digest: str
    tokenizer_size: int  # entries in the tokenizer's vocabulary
    vocab_size: int  # width of the model's logits (config.vocab_size)
    probes: TokenizedProbes
    cache: ProbeCache
    shape: tuple[int, int] | None = None  # (num_hidden_layers, hidden_size) from config.json
    shared_rows: int | None = None  # the catalog's vocabularies differ in size: the ids all share
    meta: dict = field(default_factory=dict)  # its cache's meta.json, written once every task is planned


def tokenizer_folder(catalog: Catalog, entry: ModelEntry) -> Path:
    if has_tokenizer(entry.path):
        return entry.path
    if catalog.base is not None and has_tokenizer(catalog.base):
        return catalog.base
    raise ProbeError(f"{entry.path}: model {entry.name!r} has no tokenizer files, and neither has the catalog base")


def catalog_vocab(catalog: Catalog) -> SharedVocab | None:
    """The ids the catalog's models share when their vocabulary sizes differ (checked against
    their tokenizers), else None."""
    return shared_vocab(catalog.names, [Checkpoint.open(m.path) for m in catalog.models])


def check_token_ids(probes: TokenizedProbes, vocab_size: int, entry: ModelEntry, tok_dir: Path,
                    probe_file: Path) -> None:
    """A tokenizer whose ids reach past the model's embedding rows is not this model's: refused
    here in one line, not as an index error inside an actor after Ray started."""
    for i, ids in enumerate(probes.ids):
        top = max(ids)
        if top >= vocab_size:
            raise ProbeError(f"{probe_file}: probe {i} has token id {top} (tokenizer of {tok_dir}), but model "
                             f"{entry.name!r} has vocab_size {vocab_size} ({entry.path / 'config.json'}); the "
                             f"tokenizer does not belong to the model")


def check_positions(probes: TokenizedProbes, config: object, entry: ModelEntry, probe_file: Path) -> None:
    """A probe longer than the model's positions is refused here in one line: a model with learned
    positions (GPT-2's wpe) failed with an index error inside an actor, and a rotary one ran past
    the context it was trained on without a word."""
    limit = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions answers to it too
    if not isinstance(limit, int) or limit < 1:
        return
    longest = max(range(len(probes.ids)), key=lambda i: len(probes.ids[i]))
    if len(probes.ids[longest]) > limit:
        raise ProbeError(f"{probe_file}: probe {longest} has {len(probes.ids[longest])} tokens (probes are cut to "
                         f"--max-length {probes.max_length}), more than the {limit} positions of model {entry.name!r} "
                         f"(max_position_embeddings, {entry.path / 'config.json'}); pass --max-length {limit} or less")


def plan_task(catalog: Catalog, task: str, settings: ProbeSettings, cache_dir: Path,
              vocab: SharedVocab | None = None) -> dict[str, ModelProbes]:
    """Tokenise the task's probes for every model and locate each model's cache (runs and
    writes nothing). `vocab`: catalog_vocab(catalog), given when the models' vocabulary sizes differ."""
    probe_file = catalog.task(task).probes
    if probe_file is None:
        raise ProbeError(f"{catalog.source or 'catalog'}: task {task!r} names no probe file")
    texts = load_probe_texts(probe_file)
    tokenized: dict[Path, tuple[str, int, TokenizedProbes]] = {}
    plan: dict[str, ModelProbes] = {}
    for entry in catalog.models:
        config = load_config(entry.path)
        tok_dir = tokenizer_folder(catalog, entry)
        if tok_dir not in tokenized:
            tok = load_tokenizer(tok_dir)
            tokenized[tok_dir] = (vocabulary_digest(tok), len(tok.get_vocab()),
                                  tokenize_probes(texts, tok, settings.max_length, source=str(probe_file)))
        vocab_digest, tokenizer_size, probes = tokenized[tok_dir]
        check_token_ids(probes, int(config.vocab_size), entry, tok_dir, probe_file)
        check_positions(probes, config, entry, probe_file)
        fingerprint = Checkpoint.open(entry.path).fingerprint()
        shapes = RecordShapes(tuple(len(p) for p in probes.ids), int(config.vocab_size), settings.full_vocab_limit,
                              settings.top_k, settings.attn_max_length)
        cache = ProbeCache(Path(cache_dir) / cache_key(fingerprint, probes.digest(), settings), shapes)
        meta = {"model": str(entry.path), "fingerprint": fingerprint, "probe_file": str(probe_file),
                "probe_digest": probes.digest(), "num_probes": probes.num_probes, "truncated": probes.truncated,
                "settings": settings.model_dump(), "vocab_size": int(config.vocab_size),
                "num_layers": int(config.num_hidden_layers)}
        plan[entry.name] = ModelProbes(entry.name, entry.path, vocab_digest, tokenizer_size, int(config.vocab_size),
                                        probes, cache, (int(config.num_hidden_layers), int(config.hidden_size)),
                                        vocab.rows if vocab else None, meta)
    return plan


def check_comparable(a: ModelProbes, b: ModelProbes) -> None:
    """Refuse to compare next-token distributions unless vocabularies (or, for models of different
    vocabulary sizes, their shared ids: checked by catalog_vocab), token ids, depth and width match."""
    if a.shared_rows is None and a.vocab_digest != b.vocab_digest:
        raise VocabularyError(
            f"models {a.name!r} ({a.model_dir}, {a.tokenizer_size} tokens) and {b.name!r} ({b.model_dir}, "
            f"{b.tokenizer_size} tokens) have different tokenizer vocabularies; KL between their next-token "
            f"distributions is undefined (functional features need identical vocabularies)"
        )
    if a.shared_rows is None and a.vocab_size != b.vocab_size:
        raise VocabularyError(
            f"models {a.name!r} ({a.model_dir}) and {b.name!r} ({b.model_dir}) have vocab_size "
            f"{a.vocab_size} vs {b.vocab_size}; KL needs identical output vocabularies"
        )
    if a.shape is not None and b.shape is not None and a.shape != b.shape:  # else found after every probe ran
        raise VocabularyError(
            f"models {a.name!r} ({a.model_dir}) and {b.name!r} ({b.model_dir}) have {a.shape[0]} layers of width "
            f"{a.shape[1]} vs {b.shape[0]} of {b.shape[1]} (config.json); functional features compare hidden states "
            f"layer by layer, so they need the same depth and width"
        )
    if a.probes.digest() != b.probes.digest():
        raise VocabularyError(f"models {a.name!r} and {b.name!r} tokenise the probes differently")


def probe_catalog(catalog: Catalog, settings: ProbeSettings, options: RunOptions, cache_dir: Path, *,
                  tasks: list[str] | None = None, require_comparable: bool = False, overwrite: bool = False,
                  connect: Callable[[], object] | None = None,
                  on_start: Callable[[dict[str, list[ModelProbes]]], Callable[[str, int], object] | None] | None = None,
                  ) -> tuple[dict[str, dict[str, ModelProbes]], dict[tuple[str, str], RunReport]]:
    """Plan every task, then run every model's missing probes of all tasks in one actor pool.
    Returns the plans and a run report per (task, model). `connect()` starts or joins Ray once
    every input is checked (a bad probe file is refused at once, not after Ray's start);
    `overwrite` then measures this run's entries again (they are discarded once the actors are
    known to fit, so a refused run loses nothing). `on_start(work per model)` may return a
    `progress(model name, tokens)` callable.

    With `require_comparable`, every pair must share vocabulary (or extend one vocabulary) and tokenisation (checked before
    any model runs, so a mismatch costs nothing)."""
    tasks = list(catalog.tasks) if tasks is None else tasks
    for entry in catalog.models:  # a config edited apart from its weights: one line here, not 120 from an actor
        check_config_matches_weights(Checkpoint.open(entry.path), allow_extra=True)
    vocab = catalog_vocab(catalog)
    plans = {t: plan_task(catalog, t, settings, cache_dir, vocab) for t in tasks}
    if require_comparable:
        for plan in plans.values():
            models = list(plan.values())
            for i, a in enumerate(models):
                for b in models[i + 1:]:
                    check_comparable(a, b)
    entries: dict[Path, ModelProbes] = {}
    for plan in plans.values():
        for mp in plan.values():
            entries.setdefault(mp.cache.root, mp)  # byte-identical twins: the first runs it (below)
    for mp in entries.values():
        mp.cache.check_kind()
    if connect is not None:
        connect()
    # Every input checked and the cluster known: only now does anything reach the disk.
    if overwrite or not all(mp.cache.holds(mp.meta) for mp in entries.values()):
        check_probe_actor(options)  # an actor no node can hold: refused before an entry is written or discarded
    if overwrite:
        discard_entries(cache_dir, [root.name for root in entries])
    for mp in entries.values():
        mp.cache.write_meta(mp.meta)
    # All models in one actor pool (start-up paid once); all of a model's tasks in one load.
    # Tasks with the same probes share a cache key, and so do two catalog names of byte-identical
    # weights: each key runs once, for the first model that has it (the others read its outputs).
    # DeepSpeed keeps one pool per model: a ZeRO-3 engine per process, and start-up is small next to
    # loading a model that large.
    work = [{mp.cache.root: mp for plan in plans.values() if entries[(mp := plan[entry.name]).cache.root] is mp}
            for entry in catalog.models]
    names = [entry.name for entry in catalog.models]
    progress = on_start(dict(zip(names, (list(w.values()) for w in work)))) if on_start else None
    model_work = [ModelWork(entry.path, [ProbeJob(mp.probes, mp.cache) for mp in w.values()])
                  for entry, w in zip(catalog.models, work)]
    pools = [list(range(len(work)))] if options.backend == "hf" else [[i] for i in range(len(work))]
    done: dict[int, list[RunReport]] = {}
    for pool in pools:
        ran = run_jobs([model_work[i] for i in pool], settings, options,
                       progress=(lambda m, tokens, pool=pool: progress(names[pool[m]], tokens)) if progress else None)
        done.update(zip(pool, ran))
    ran_for = {root: (i, report) for i, w in enumerate(work) for root, report in zip(w, done[i])}
    reports: dict[tuple[str, str], RunReport] = {}
    for i, entry in enumerate(catalog.models):
        for task, plan in plans.items():
            owner, report = ran_for[plan[entry.name].cache.root]
            reports[(task, entry.name)] = report if owner == i else RunReport(0, 0, report.seconds)
    return plans, reports
