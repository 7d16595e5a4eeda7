"""Several merges that read each other, run as one: a plan's chain of steps, or a multi-document
mergekit config (the file `mergekit-multi` runs).

A multi-document config is a YAML file of mergekit configs separated by `---`, each with a
`name:`; a later document reads an earlier merge by giving its name where a model path goes (a
name wins over a folder of the same name, as in mergekit). At most one document is unnamed: the
final merge, written to --out. Without one, the final is the one named merge no other reads;
with several such merges the file is refused, and so is, beside an unnamed final, a named merge
nothing reads (simmerge keeps only the final output, so it would be thrown away) unless
--intermediate-dir keeps every named merge: it is then run and kept there, as mergekit-multi does.
Names are folder names (no slashes or whitespace, not starting with `.`), and not `base` or
`union`, which mergekit reads as tokenizer keywords where a tokenizer source goes.

Every document is checked before anything runs (its fields as a single config, its references,
the graph: duplicates, cycles, the final; the checkpoints of merges that read no other merge,
headers only). The merges run in dependency order with the streaming engine, each intermediate
in a work folder beside --out, removed once every merge reading it has finished; the final is
written beside --out and renamed into place. A run that fails keeps the finished intermediates
that are still to be read, and the next run of the same --out resumes from them while their
keys match: the same configs over the very same files (merge/resume.py). With --intermediate-dir
the intermediates go to DIR/<name> instead and are kept (merge/intermediate_dir.py). Each config is
parsed as written, an earlier merge's name bound to its folder, so the output's recorded config,
card and warnings name it as the file does, never by a folder that is gone after the run."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simmerge_ray.errors import ConfigError, OutputError, SimMergeError
from simmerge_ray.io.atomic import missing_parents
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.out_checks import check_replaceable
from simmerge_ray.merge.config import MergeSpec, Provenance
from simmerge_ray.merge.executor import ExecOptions, MergeResult, check_merge, run_merge
from simmerge_ray.merge.intermediate_dir import OPTION, appeared_meanwhile, describe_reuse, plan_kept, record_kept
from simmerge_ray.merge.model_refs import local_checkpoint, model_refs
from simmerge_ray.merge.resume import (KEY_SUFFIX, TOKENIZER_KEYWORDS, Stage, StageKeys, adopt_kept, key_file,
                                       kept_stages, new_work_folder, record_stage, release, stage_folder,
                                       stages_to_run)
from simmerge_ray.yaml_io import check_name, read_yaml_documents

log = logging.getLogger(__name__)

FINAL = "the final"


@dataclass(frozen=True)
class Words:
    """How the log names kept stages ("steps 1-2 of 3 of the plan") and the ones a run resumes
    after ("the plan after step 2 of 3")."""

    kept: Callable[[list[str]], str]
    resumed: Callable[[list[str]], str]


@dataclass(frozen=True)
class StageGraph:
    """Merges to run together: `stages` in dependency order, the final (written to --out) last."""

    stages: tuple[Stage, ...]
    root: Path | None = None  # relative model paths resolve here (a config file's folder)
    seed: int = 0  # stochastic methods' seed, every stage's
    # The model card's account of a stage, an earlier one named by its name (None: the config alone).
    provenance: Callable[[Stage], Provenance] | None = None
    words: Words | None = None
    source: str = "config"
    # The files and folders the merges read (checkpoints, the config file): --intermediate-dir may
    # not be, hold or lie inside one (merge/intermediate_dir.py check_place).
    inputs: tuple[Path, ...] = ()


def _default_words(source: str, n: int) -> Words:
    def names(kept: list[str]) -> str:
        return f"merge{'s' * (len(kept) != 1)} {', '.join(repr(k) for k in kept)} of the {n} of {source}"

    return Words(kept=names, resumed=lambda kept: f"{source} after {names(kept)}")


def run_stages(graph: StageGraph, out: Path, opts: ExecOptions = ExecOptions(),
               keep_in: Path | None = None, *, start: Callable[[], None] | None = None) -> list[MergeResult]:
    """Run the graph's merges into `out`, each intermediate in a work folder beside it (removed
    on success; kept when a merge fails after others finished, and resumed from by the next run
    for `out` while their keys still match: the same configs over the very same files). With
    `keep_in` (--intermediate-dir) each intermediate is written to keep_in/<name> instead, kept
    after the run, and reused while its record proves it current (merge/intermediate_dir.py).
    `keep_in` is checked against the graph's `inputs` (intermediate_dir.plan_kept). `start`, when
    given, is called once every check has passed, before the first merge: the command starts Ray
    there, so a refused --out or --intermediate-dir never starts it.
    Returns the results of the merges this run made (the final's last): fewer than the stages
    for a resumed run."""
    out = Path(out)
    stages = list(graph.stages)
    check_replaceable(out, overwrite=opts.overwrite)  # an empty folder is used, as for a config
    words = graph.words or _default_words(graph.source, len(stages))
    keys = StageKeys(stages, graph.root, graph.seed, opts.compute_dtype, opts.allow_nonfinite)
    if keep_in is not None:
        kept = plan_kept(keep_in, stages, keys, out=out, overwrite=opts.overwrite, inputs=graph.inputs)
        if (line := describe_reuse(kept)) is not None:
            log.warning("%s: %s", out, line)
        folders = {s.name: stage_folder(kept.folder, s.name) for s in stages[:-1]}
        if start is not None:
            start()
        return _merge_stages(graph, list(kept.todo), out, opts, keys, folders, kept.folder, keep=True,
                             replaced=kept.replaced)
    made = missing_parents(out)  # created for the work folder; removed again if nothing is kept
    work = new_work_folder(out)
    results: list[MergeResult] = []
    done = False
    try:  # from here on the work folder goes unless it holds a finished stage to resume from
        reused = adopt_kept(out, work, stages, keys, words.resumed)  # and removes dead runs' folders
        todo, _ = stages_to_run(stages, reused)
        folders = {s.name: stage_folder(work, s.name) for s in stages[:-1]}
        if start is not None:
            start()
        results = _merge_stages(graph, todo, out, opts, keys, folders, work, keep=False)
        done = True
    finally:
        kept_names = [] if done else kept_stages(work)
        if not kept_names:
            shutil.rmtree(work, ignore_errors=True)
            for folder in made:  # deepest first; after a success the first holds `out` and stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        else:
            log.warning("%s: kept %s in %s; the same command resumes from there (unless a model they read "
                        "changed); remove the folder to start afresh", out, words.kept(kept_names), work)
        release(work)  # last: a later run of this process may take it only once it is left as it stays
    return results


def _merge_stages(graph: StageGraph, todo: list[Stage], out: Path, opts: ExecOptions, keys: StageKeys,
                  folders: dict[str, Path], place: Path, *, keep: bool,
                  replaced: frozenset[str] = frozenset()) -> list[MergeResult]:
    """Merge `todo` in order, the final into `out`, each intermediate into its folder in `place`
    and recorded by its key once published. Each config is parsed as written, an earlier merge's
    name bound to its folder, so the output's recorded config and card name it as the user did.
    `keep`: the intermediates stay (--intermediate-dir), else they are in a work folder and each
    goes once no merge still to run reads it; `replaced`: the kept folders' stages that
    --overwrite replaces (the rest are new)."""
    last_stage = graph.stages[-1]
    readers = {s.name: {t.name for t in todo if s.name in t.deps} for s in graph.stages}
    results: list[MergeResult] = []
    for stage in todo:
        last = stage is last_stage
        key = None if last else keys.key(stage.name)  # the files it reads, before it reads them
        spec = MergeSpec.from_dict(stage.config, root=graph.root or place, source=stage.source, seed=graph.seed,
                                   pending={d: folders[d] for d in stage.deps})
        if graph.provenance is not None:
            prov = graph.provenance(stage)
            spec = replace(spec, provenance=replace(prov, kept={d: str(folders[d]) for d in stage.deps}) if keep
                           else prov)
        # A stale record in `place` stays until record_kept replaces it: it names other files than
        # the ones this merge publishes, so it cannot vouch for them, and a concurrent run's fresh
        # record (of a merge that run published after this one was planned) is never deleted.
        overwrite = opts.overwrite if last else keep and stage.name in replaced
        try:
            results.append(run_merge(spec, out if last else folders[stage.name], replace(opts, overwrite=overwrite)))
        except OutputError:
            if keep and not last and stage.name not in replaced:
                appeared_meanwhile(place, stage.name)  # raises its own account when it did
            raise
        if key is not None:  # run_merge published the folder whole; now it may be reused
            (record_kept if keep else record_stage)(place, stage.name, key)
        for d in () if keep else stage.deps:  # read by no merge still to run: gone
            readers[d].discard(stage.name)
            if not readers[d]:
                key_file(place, d).unlink(missing_ok=True)
                shutil.rmtree(stage_folder(place, d), ignore_errors=True)
    return results


# ---- multi-document mergekit configs -------------------------------------------------------------

@dataclass(frozen=True)
class MultiConfig:
    """A validated multi-document config: its merges in run order, each parsed as a MergeSpec."""

    path: Path
    graph: StageGraph
    specs: dict[str, MergeSpec]  # by stage name; an earlier merge's output read as its name
    checkpoints: dict[str, tuple[Path, ...]]  # by stage: every checkpoint behind its output

    @property
    def inputs(self) -> list[Path]:
        """Every checkpoint folder the merges read (their outputs may not be, hold or lie in one)."""
        seen: dict[Path, None] = {}
        for paths in self.checkpoints.values():
            seen.update(dict.fromkeys(paths))
        return list(seen)


def is_multi_document(docs: Sequence[Any]) -> bool:
    """Whether parsed YAML documents are a multi-document config: more than one non-empty
    document, or one with a `name:` (a single unnamed document is a plain config)."""
    real = [d for d in docs if d is not None]
    return len(real) > 1 or (len(real) == 1 and isinstance(real[0], dict) and "name" in real[0])


def _label(path: Path, index: int, name: str | None) -> str:
    return f"{path}: document {index} ({name!r})" if name is not None else f"{path}: document {index} (unnamed)"


def _check_doc_name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: name: expected a name, got {value!r}")
    try:
        check_name(value)
    except ValueError as e:
        raise ConfigError(f"{where}: name: {value!r} {e}") from None
    if value.startswith(".") or value.endswith(KEY_SUFFIX):
        raise ConfigError(f"{where}: name: {value!r} may not start with '.' or end with {KEY_SUFFIX!r} "
                          "(it names the merge's folder)")
    if value in TOKENIZER_KEYWORDS:
        raise ConfigError(f"{where}: name: {value!r} is a tokenizer keyword (mergekit reads `tokenizer_source: "
                          f"{value}` and a tokenizer `source: {value}` as the keyword, not as this merge): give "
                          "the merge another name")
    return value


def _order(path: Path, docs: list[tuple[int, str | None, dict]], deps: dict[str | None, list[str]]
           ) -> list[str | None]:
    """The names in dependency order (file order where free); a cycle is one ConfigError."""
    index = {name: i for i, name, _ in docs}
    order: list[str | None] = []
    state: dict[str | None, int] = {}  # 1: being visited, 2: done

    def visit(name: str | None, trail: list[str | None]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = trail[trail.index(name):] + [name]
            raise ConfigError(f"{_label(path, index[name], name)}: the merges read each other in a cycle: "
                              + " -> ".join(str(n) for n in cycle))
        state[name] = 1
        for d in deps[name]:
            visit(d, trail + [name])
        state[name] = 2
        order.append(name)

    for _, name, _ in docs:
        visit(name, [])
    return order


def load_multi(path: str | Path, *, seed: int = 0, keeps_intermediates: bool = False,
               allow_crimes: bool = False) -> MultiConfig:
    """Parse and check a multi-document config (see the module docstring); every problem is one
    ConfigError naming the file, the document (index and name) and the field.
    `keeps_intermediates` (--intermediate-dir, where every named merge is kept): a named merge
    that no other reads, beside an unnamed final, is run and kept too, as mergekit-multi keeps it."""
    path = Path(path)
    root = path.parent
    raw = read_yaml_documents(path, "merge config")
    docs: list[tuple[int, str | None, dict]] = []
    seen: dict[str | None, int] = {}
    for i, doc in enumerate(raw, start=1):
        if doc is None:
            continue  # an empty document (a trailing `---`)
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: document {i}: a merge config is a mapping, got {type(doc).__name__}")
        name = _check_doc_name(doc["name"], f"{path}: document {i}") if "name" in doc else None
        if name in seen:
            if name is None:
                raise ConfigError(f"{path}: document {i}: a second unnamed merge (document {seen[None]} is "
                                  "unnamed too); only the final merge may be unnamed: give the others a name:")
            raise ConfigError(f"{path}: document {i}: name: {name!r} is already document {seen[name]}'s name")
        seen[name] = i
        docs.append((i, name, {k: v for k, v in doc.items() if k != "name"}))
    if not docs:
        raise ConfigError(f"{path}: no merge config in the file")
    names = {n for _, n, _ in docs if n is not None}
    deps: dict[str | None, list[str]] = {}
    for i, name, cfg in docs:
        found: list[str] = []
        for field, ref in model_refs(cfg):
            if ref in names:
                if ref not in found:
                    found.append(ref)
            elif field.rsplit(".", 1)[-1] in ("model", "base_model") and local_checkpoint(ref, root) is None:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigError(f"{_label(path, i, name)}: {field}: {ref!r} is neither a local checkpoint "
                                  f"folder nor the name of a merge in the file (names: {known})")
        deps[name] = found
    order = _order(path, docs, deps)
    read = {d for ds in deps.values() for d in ds}
    unread = [n for _, n, _ in docs if n is not None and n not in read]
    by_name = {n: (i, cfg) for i, n, cfg in docs}
    if None in by_name:
        final: str | None = None
        if unread and not keeps_intermediates:
            raise ConfigError(f"{_label(path, by_name[unread[0]][0], unread[0])}: no other merge reads it and it "
                              f"is not the final merge (the unnamed document {by_name[None][0]}): its output would "
                              f"be thrown away; remove it, read it in a later merge, or pass {OPTION} DIR to keep "
                              "it in DIR/<name>")
    elif len(unread) == 1:
        final = unread[0]
    else:
        raise ConfigError(f"{path}: no unnamed final merge, and {len(unread)} merges are read by no other "
                          f"({', '.join(map(repr, unread))}): leave exactly one document unnamed (the final)")
    order = [n for n in order if n != final] + [final]
    specs: dict[str, MergeSpec] = {}
    stages: list[Stage] = []
    checkpoints: dict[str, tuple[Path, ...]] = {}
    for name in order:
        i, cfg = by_name[name]
        label = _label(path, i, name)
        spec = MergeSpec.from_dict(cfg, root=root, source=label, seed=seed,
                                   pending={d: Path(d) for d in deps[name]})
        stage_name = name if name is not None else FINAL
        own = tuple(m.path for m in spec.inputs if m.ref not in deps[name])
        behind = dict.fromkeys(p for d in deps[name] for p in checkpoints[d])
        checkpoints[stage_name] = tuple(dict.fromkeys([*behind, *own]))
        _check_inputs(spec, label, has_deps=bool(deps[name]), pending=set(deps[name]), allow_crimes=allow_crimes)
        specs[stage_name] = spec
        stages.append(Stage(stage_name, cfg, tuple(deps[name]), label))
    inputs = (*dict.fromkeys(p for ps in checkpoints.values() for p in ps), path)
    graph = StageGraph(tuple(stages), root=root, seed=seed, source=str(path),
                       provenance=_multi_provenance(path, stages, checkpoints), inputs=inputs)
    return MultiConfig(path, graph, specs, checkpoints)


def _check_inputs(spec: MergeSpec, label: str, *, has_deps: bool, pending: set[str], allow_crimes: bool) -> None:
    """A merge that reads no other one is checked as `merge` checks a config (headers, shapes,
    tokenizers); the checkpoints of one that does are opened (headers only)."""
    try:
        if not has_deps:
            check_merge(spec, allow_crimes=allow_crimes)
            return
        for m in spec.inputs:
            if m.ref not in pending:
                Checkpoint.open(m.path)
    except SimMergeError as e:
        if str(e).startswith(label):
            raise
        raise type(e)(f"{label}: {e}") from None


def _multi_provenance(path: Path, stages: list[Stage], checkpoints: dict[str, tuple[Path, ...]]
                      ) -> Callable[[Stage], Provenance]:
    """The model card of a merge of the file: the file, the merge by name, its inputs' merges by
    name, as the config itself does (never by a temporary folder)."""
    chain = " -> ".join(s.name for s in stages)

    def provenance(stage: Stage) -> Provenance:
        steps = {d: f"merge {d!r} of {path}" for d in stage.deps}
        what = f"merge {stage.name!r}" if stage is not stages[-1] or stage.name != FINAL else "the final merge"
        origin = f"{what[0].upper()}{what[1:]} of the multi-document config `{path}` ({chain})."
        return Provenance(origin=origin, names={}, steps=steps,
                          models=tuple(str(p) for p in checkpoints[stage.name]))

    return provenance


def run_multi(multi: MultiConfig, out: Path, opts: ExecOptions = ExecOptions(),
              keep_in: Path | None = None, *, start: Callable[[], None] | None = None) -> list[MergeResult]:
    """Run a loaded multi-document config into `out` (run_stages: resumable); `keep_in`:
    --intermediate-dir, where the named merges are written and kept, checked against the
    config's inputs (its checkpoints and the file); `start`: run_stages'."""
    return run_stages(multi.graph, out, opts, keep_in, start=start)
