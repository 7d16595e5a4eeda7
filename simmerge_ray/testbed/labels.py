"""`label`: merge and evaluate every plan on Ray actors, cached per plan, then write the tables.

Each actor loads the catalog's weights, tokenizer and eval sets once, then merges in memory and
scores the result; plans of one subset go to the same call so merge prefixes are shared. Every
finished plan is written to `OUT/cache/<key>.json` (key = content of the models, operators,
parameters and eval sets) as soon as its call returns, so an interrupted run resumes where it
stopped and a rerun recomputes nothing. An entry carries a digest of its key and content and is
served only when it matches (a damaged or hand-edited one is measured again).

Outputs: labels.parquet (2-way), labels_multiway.parquet (3-/4-way), model_scores.parquet,
gap_summary.parquet and label_summary.json.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from simmerge_ray import resources
from simmerge_ray.actor_pool import ActorPool
from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.io.architecture import check_config_matches_weights, check_same_tensors, loaded_name
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.checkpoint import TIED_HEADS, Checkpoint, merged_head
from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.io.out_checks import check_not_input
from simmerge_ray.io.shared_vocab import SharedVocab, shared_vocab
from simmerge_ray.io.stage_files import adopt_stage_files, check_stage, stage_files, stage_owned
from simmerge_ray.testbed import label_evals
from simmerge_ray.testbed.label_plans import LabelSettings, LabelPlan, empty_size_reasons, enumerate_plans
from simmerge_ray.merge.arms import get_arm, get_weighting
from simmerge_ray.testbed.label_tables import gap_summary, model_scores_table, multiway_table, pairwise_table
from simmerge_ray.testbed.merging import merge_arm, merge_state_dicts

if TYPE_CHECKING:
    from simmerge_ray.testbed.evaluate import EncodedEvalSet

LABEL_STAGE = "labels"
SUMMARY_FILE = "label_summary.json"
ABSENT, NO_DIGEST = "absent", "no digest"  # cache misses run_labels does not log one by one
LABEL_FILES = ("labels.parquet", "labels_multiway.parquet", "model_scores.parquet", "gap_summary.parquet", SUMMARY_FILE)


@dataclass(frozen=True)
class LabelRunReport:
    total: int  # distinct merges in the run (a mirrored 2-way plan is measured once)
    computed: int  # measured by this call
    cached: int  # found in the cache
    complete: bool  # every plan measured: tables written
    seconds: float
    out: Path


def _read_state(ck: Checkpoint, head: str | None, vocab: SharedVocab | None, index: int) -> dict[str, torch.Tensor]:
    """Every stored tensor; with `head` (some model of the catalog stores it), a model that ties
    it to its embedding gets it as that embedding, as `merge` reads it; with `vocab` (models of
    different vocabulary sizes), vocabulary tensors keep their shared rows."""
    state = {name: ck.read(name) for name in ck.entries}
    if head is not None and head not in state:
        state[head] = state[ck.stored_name(head)]
    if vocab is not None:
        state = {n: t[:vocab.rows] if vocab.is_vocab_tensor(index, n, t.shape) else t for n, t in state.items()}
    return state


def stored_dtypes(ckpts: dict[str, Checkpoint]) -> dict[str, str] | None:
    """Each model's stored dtypes (one string), or None when every model stores its tensors
    alike: a merge is cast to its first model's dtypes, so only then may the label run swap a
    merge's first two models (LabelPlan.canonical)."""
    signature = {name: json_digest(sorted((n, e.dtype) for n, e in ck.entries.items())) for name, ck in ckpts.items()}
    return None if len(set(signature.values())) <= 1 else signature


def label_vocab(cat: Catalog, experts: dict[str, str]) -> SharedVocab | None:
    """The ids the base and the experts share when their vocabulary sizes differ (a fine-tune
    that added tokens or padded its embedding): plans are merged and scored on those rows."""
    return shared_vocab(["base", *experts], [Checkpoint.open(cat.base), *(Checkpoint.open(cat.model(m).path)
                                                                           for m in experts)])


class PlanEvaluator:
    """An inference actor (resources.inference_ask()): holds one catalog's weights and encoded
    eval sets; merges and scores plans."""

    def __init__(self, catalog_path: str, threads: int = 1) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(threads)
        cat = Catalog.load(catalog_path)
        experts = check_label_catalog(cat)
        vocab = label_vocab(cat, experts)
        ckpts = {"base": Checkpoint.open(cat.base)} | {m: Checkpoint.open(cat.model(m).path) for m in experts}
        # A head stored by some model and tied by others is merged as a tensor of its own, so the
        # scored model keeps it untied (as `merge` writes it).
        head = merged_head(ckpts.values())
        self.states = {name: _read_state(ck, head, vocab, i) for i, (name, ck) in enumerate(ckpts.items())}
        self.evals = label_evals.encoded_evals(cat)
        config = AutoConfig.from_pretrained(str(cat.base), local_files_only=True)
        if head is not None:
            config.tie_word_embeddings = False
        if vocab is not None:
            config.vocab_size = vocab.rows
        self.model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        # Merged under their names as Checkpoint reads them (stochastic arms seed each tensor's masks by its name, as
        # `merge` does), loaded under the model's (GPT-NeoX's embed_out is its lm_head).
        self.rename = functools.cache(loaded_name(self.model))
        # Heads the scoring model ties to its embedding: no model stores them, and loading the
        # embedding sets them (the state dict lists a tied head under its own name too).
        ties = head is None and config.tie_word_embeddings
        self.tied = {h for h in TIED_HEADS if h in self.model.state_dict()} if ties else set()

    def run(self, plans: list[LabelPlan]) -> list[dict[str, dict[str, float]]]:
        """Per plan: {task: score()}, the label run's record."""
        from simmerge_ray.testbed.evaluate import score

        memo: dict[tuple, dict[str, torch.Tensor]] = {}
        out = []
        for plan in plans:
            self._load(plan, memo)
            out.append({t: score(self.model, self.evals[t]) for t in plan.tasks})
        return out

    def example_accuracy(self, plans: list[LabelPlan]) -> list[dict[str, list[float]]]:
        """Per plan: {task: accuracy of every eval example}, whose mean is run()'s accuracy."""
        from simmerge_ray.testbed.evaluate import example_scores

        memo: dict[tuple, dict[str, torch.Tensor]] = {}
        out = []
        for plan in plans:
            self._load(plan, memo)
            out.append({t: example_scores(self.model, self.evals[t])[1].tolist() for t in plan.tasks})
        return out

    def _load(self, plan: LabelPlan, memo: dict[tuple, dict[str, torch.Tensor]]) -> None:
        """Merge the plan into the scoring model; `memo` keeps fold prefixes shared by a call's plans."""
        coef = plan.linear_coefficients()
        if coef is not None and plan.k > 1:  # one linear combination in one pass, as `merge --plan` runs it
            cur = merge_state_dicts("linear", [self.states[m] for m in coef], None,
                                    {"weight": list(coef.values()), "normalize": False})
        else:
            cur = self.states[plan.models[0]]
            arms = plan.step_arms()
            for j, arm in enumerate(arms):
                prefix = (plan.models[: j + 2], tuple(a.name for a in arms[: j + 1]))
                if prefix not in memo:
                    memo[prefix] = merge_arm(arm, cur, self.states[plan.models[j + 1]], self.states["base"])
                cur = memo[prefix]
        missing, unexpected = self.model.load_state_dict({self.rename(n): t for n, t in cur.items()}, strict=False)
        if unexpected or set(missing) - self.tied:
            raise RuntimeError(f"merged weights do not fit the scoring model: missing "
                               f"{sorted(set(missing) - self.tied)}, unexpected {sorted(unexpected)}")


def check_label_catalog(cat: Catalog) -> dict[str, str]:
    """The catalog's experts (name -> task), after checking it can be labelled at all."""
    if cat.base is None:
        raise ConfigError(f"{cat.source}: labels need a 'base' (ties merges task vectors against it)")
    experts = {m.name: m.task for m in cat.models if m.task}
    if "base" in cat.names:  # a task-less one too: it would stand for the base in the keys and records
        raise ConfigError(f"{cat.source}: a model may not be named 'base' (reserved for the catalog's base)")
    for t in sorted(set(experts.values())):
        entry = cat.tasks.get(t)
        if entry is None or entry.eval is None:
            raise ConfigError(f"{cat.source}: tasks.{t}: an 'eval' file is needed to label merges")
    if len(set(experts.values())) < 2:
        raise ConfigError(f"{cat.source}: labels need experts of at least two tasks")
    return experts


def check_label_models(cat: Catalog, experts: dict[str, str]) -> dict[str, EncodedEvalSet]:
    """Plans are merged in memory into one model built from the base's config, so every
    checkpoint's config.json must describe its own weights, and every expert must match the base
    tensor for tensor (a tied head counts as its embedding): a bad config, or a deeper, wider or
    re-vocabularied model, is named here, from the configs and headers, before Ray starts (not in
    an actor's traceback), as is a base without a tokenizer (it encodes the eval sets) or an eval
    example it cannot split into prompt and answer tokens. A model that extends the base's
    vocabulary (added tokens, padded rows) is merged on the rows they share, and no eval example
    may need more. Returns the encoded eval sets (run_labels' `evals`: not encoded twice)."""
    ckpts = [Checkpoint.open(cat.base), *(Checkpoint.open(cat.model(m).path) for m in experts)]
    for ck in ckpts:
        check_config_matches_weights(ck)
    vocab = label_vocab(cat, experts)
    check_same_tensors(["base", *experts], ckpts, vocab)
    evals = label_evals.encoded_evals(cat)  # an example the base's tokenizer cannot split is named here, not in an actor
    for t, data in evals.items() if vocab is not None else ():
        if int(data.input_ids.max()) >= vocab.rows:
            raise ConfigError(f"{cat.tasks[t].eval}: the base's tokenizer gives ids past the {vocab.rows} the models "
                              f"share; plans are scored on those rows only")
    return evals


def _calls(todo: list[tuple[str, LabelPlan]], per_call: int) -> list[list[tuple[str, LabelPlan]]]:
    """Batch plans over the same model set together (shared merge prefixes), `per_call` at most."""
    groups: dict[frozenset, list] = defaultdict(list)
    for item in todo:
        groups[frozenset(item[1].models)].append(item)
    return [g[i:i + per_call] for g in groups.values() for i in range(0, len(g), per_call)]


def run_labels(catalog_path: Path, out: Path, settings: LabelSettings, *, max_plans: int | None = None,
               log: Callable[[str], None] = print, evals: Mapping[str, EncodedEvalSet] | None = None) -> LabelRunReport:
    """Measure every plan not yet cached under `out` (at most `max_plans` new ones), then, if
    all are measured, write the tables. Ray must be initialised. `evals`: check_label_models'
    (else encoded here); the actors, given the catalog, encode their own in their processes."""
    if max_plans is not None and max_plans < 0:  # todo[:-1] would drop a plan without a word
        raise ConfigError(f"max_plans: {max_plans} is not at least 0")
    t0 = time.perf_counter()
    cat = Catalog.load(catalog_path)
    experts = check_label_catalog(cat)
    vocab = label_vocab(cat, experts)
    rows = f"|rows:{vocab.rows}" if vocab else ""  # merged on the shared rows: another merge than in full
    ckpts = {"base": Checkpoint.open(cat.base), **{m.name: Checkpoint.open(m.path) for m in cat.models}}
    measured_from = {name: ck.fingerprint() for name, ck in ckpts.items()}  # as the feature stages record them
    fingerprints = {name: fp + rows for name, fp in measured_from.items()}
    dtypes = stored_dtypes(ckpts)
    tasks = sorted(cat.tasks)
    task_digests = {t: label_evals.eval_digest(data)
                    for t, data in (label_evals.encoded_evals(cat) if evals is None else evals).items()}
    plans = enumerate_plans(experts, [t for t in tasks if t in task_digests], settings)
    keyed = [(p.key(fingerprints, task_digests, dtypes), p) for p in plans]
    cache = Path(out) / "cache"
    if cache.exists() and not cache.is_dir():  # mkdir's FileExistsError was a traceback
        raise OutputError(f"{cache}: not a folder, where the label run keeps its cache; move it away")
    cache.mkdir(parents=True, exist_ok=True)
    unique: dict[str, LabelPlan] = {}  # a merge of two spellings is measured once, under its canonical form
    for k, p in keyed:
        unique.setdefault(k, p)
    todo, undigested = [], []
    measured: dict[str, dict] = {}  # key -> scores, as checked (the tables use these, not a second read)
    for k, p in unique.items():
        why = _entry_miss(cache / f"{k}.json", k, p.tasks, measured)
        if why is None:
            continue
        todo.append((k, p.canonical(dtypes)))
        if why == NO_DIGEST:  # every entry of an older cache: one line, not thousands
            undigested.append(k)
        elif why != ABSENT:
            log(f"label: ignoring cache entry {cache / f'{k}.json'} ({why}); removed, measuring it again")
    if undigested:
        log(f"label: ignoring {len(undigested)} cache entries without a digest (written before entries had one, "
            f"or rewritten by hand; e.g. {cache / f'{undigested[0]}.json'}); removed, measuring them again")
    cached = len(unique) - len(todo)
    if max_plans is not None:
        todo = todo[:max_plans]
    log(f"label: {len(keyed)} plans ({len(unique)} distinct merges), {cached} cached, {len(todo)} to measure")
    sizes = Counter(p.k for p in plans if p.k > 1)
    reasons = empty_size_reasons(experts, settings)
    alone = sum(p.k == 1 for p in plans)  # each expert and the base, scored as they are (the gaps' ends)
    log(f"label: {alone} models alone; " + "; ".join(f"{k}-way: {sizes[k]} plans" if sizes[k] else f"{k}-way: none ({reasons.get(k, 'no samples')})"
                              for k in (2, 3, 4)))

    calls = _calls(todo, settings.plans_per_call)
    computed = 0
    if calls:
        ask = resources.inference_ask()
        sent = [[p for _, p in batch] for batch in calls]
        given = settings.workers if "workers" in settings.model_fields_set else None  # else the default's
        workers, size_from = resources.pool_size(given, settings.workers)
        with ActorPool(PlanEvaluator, min(workers, len(calls)), ask, what="label actor", size_from=size_from,
                       args=(str(Path(catalog_path).resolve()), max(1, int(ask.num_cpus)))) as pool:
            for k, results in pool.map_unordered("run", sent):
                batch = calls[k]
                for (key, plan), scores in zip(batch, results):
                    record = {"models": plan.models, "operators": plan.operators, "weighting": plan.weighting,
                              "scores": scores}
                    record["digest"] = _entry_digest(key, record)
                    atomic_write_text(cache / f"{key}.json", json.dumps(record))
                    measured[key] = scores
                computed += len(batch)
                if computed % 200 < len(batch):
                    log(f"label: {computed}/{len(todo)} measured ({time.perf_counter() - t0:.0f}s)")

    complete = cached + computed == len(unique)
    if complete:
        _write_tables(Path(out), keyed, measured, experts, settings, time.perf_counter() - t0, log, measured_from)
    return LabelRunReport(len(unique), computed, cached, complete, time.perf_counter() - t0, Path(out))


def _entry_digest(key: str, record: dict) -> str:
    """What a cache entry is checked by: its content and its key (an entry copied under another
    plan's name does not match either), all but the digest itself."""
    return json_digest({"key": key, **{k: v for k, v in record.items() if k != "digest"}})


def _entry_miss(entry: Path, key: str, tasks: tuple[str, ...], measured: dict[str, dict]) -> str | None:
    """Why a plan's cache entry cannot be served (ABSENT, NO_DIGEST or what is wrong with it), or
    None when it holds scores on every one of its `tasks` under a digest that matches: then its
    scores are put in `measured` under `key`. A bad entry
    (unreadable, incomplete, without a digest or altered) is removed, to be measured again, so a
    damaged cache heals instead of failing every rerun or serving wrong labels."""
    if entry.is_dir():  # not an entry this cache wrote: named, never removed
        raise OutputError(f"{entry}: a folder, where the label cache keeps an entry (a file); move it away")
    try:
        record = json.loads(entry.read_text())
    except FileNotFoundError:
        return ABSENT
    except (OSError, ValueError, RecursionError) as e:
        return _remove(entry, f"{type(e).__name__}: {e}")
    if not isinstance(record, dict):
        return _remove(entry, "not a JSON object")
    if "digest" not in record:
        return _remove(entry, NO_DIGEST)
    # json round-trips floats exactly: the digest of the content read back is the one written
    if record["digest"] != _entry_digest(key, record):
        return _remove(entry, "digest mismatch")
    scores = record.get("scores")
    if not isinstance(scores, dict):
        return _remove(entry, "no scores")
    for t in tasks:
        got = scores.get(t)
        if not (isinstance(got, dict) and all(isinstance(got.get(m), (int, float)) for m in ("score", "accuracy"))):
            return _remove(entry, f"no score and accuracy on {t!r}")
    measured[key] = scores
    return None


def _remove(entry: Path, why: str) -> str:
    """Remove a bad entry (so that it is measured and written again) and say why."""
    entry.unlink(missing_ok=True)
    return why


def _write_tables(out: Path, keyed: list[tuple[str, LabelPlan]], measured: dict[str, dict], experts: dict[str, str],
                  settings: LabelSettings, seconds: float, log: Callable[[str], None],
                  checkpoints: dict[str, str]) -> None:
    results = [(p, measured[k]) for k, p in keyed]
    metric = settings.metric
    singles = {p.models[0]: {t: s[metric] for t, s in sc.items()} for p, sc in results if p.k == 1}
    merged = [(p, {t: s[metric] for t, s in sc.items()}) for p, sc in results if p.k > 1]
    labels, dropped = pairwise_table([r for r in merged if r[0].k == 2], singles, experts, settings.epsilon)
    multi = multiway_table([r for r in merged if r[0].k > 2], singles, experts)
    if labels["utility"].is_not_null().sum() == 0:
        log(f"label: no expert-auxiliary pair's {settings.metric} gap exceeds {settings.epsilon} on both tasks "
            f"({dropped} pair-arm rows dropped): the tables hold no two-sided utility to fit a selector on")
    summary = gap_summary(labels)
    info = {
        "settings": settings.model_dump(mode="json"),
        "metric": settings.metric,
        "gap_epsilon": settings.epsilon,
        "params": {a: {"method": get_arm(a).method, **get_arm(a).params}
                   for a in dict.fromkeys(settings.operators + settings.step_operators)},
        "weightings": {w: get_weighting(w).doc for w in settings.weightings},
        "plans": len(keyed),
        "labels_2way": labels.height,
        "pairs_2way": labels.select("task", "expert", "aux").unique().height,  # rows: one per arm
        # of those, the pairs with both sides' gaps: the two-sided utility fit and the bandit learn from
        "pairs_utility": labels.filter(labels["utility"].is_not_null()).select("task", "expert", "aux").unique().height,
        "dropped_2way_small_gap": dropped,
        "labels_3way": int((multi["k"] == 3).sum()),
        "labels_4way": int((multi["k"] == 4).sum()),
        "seconds_last_run": seconds,
        "utility": summary.to_dicts(),
        "gap_closed": gap_summary(labels, "gap_closed").to_dicts(),
        # content fingerprints of the base ("base") and every model: fit checks its features describe these
        "checkpoints": checkpoints,
    }
    tables = {"labels": labels, "labels_multiway": multi, "model_scores": model_scores_table(singles),
              "gap_summary": summary}
    with stage_files(out, LABEL_STAGE, LABEL_FILES, replace=True) as tmp:
        for name, df in tables.items():
            df.write_parquet(tmp / f"{name}.parquet")
        (tmp / SUMMARY_FILE).write_text(json.dumps(info, indent=1))


def check_label_output(out: Path, inputs: list[Path]) -> None:
    """Refuse, before any work, an --out that is or lies in an input, is a file, or holds label
    tables the label stage did not write (a folder it wrote before it kept a marker, recognised
    by its label_summary.json, is adopted)."""
    out = Path(out)
    check_not_input(out, inputs)  # before adopting: a marker is never written into an input
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and {"settings", "plans", "labels_2way"} <= set(summary) and not stage_owned(out):
        adopt_stage_files(out, LABEL_STAGE, LABEL_FILES)
    check_stage(out, LABEL_FILES, replace=True, inputs=inputs)
