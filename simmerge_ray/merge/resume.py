"""Resume an interrupted run of several merges (a plan's steps, a multi-document mergekit config):
the intermediate outputs are kept in the run's work folder when a run fails, and the next run of
the same --out reuses those still valid.

Each kept stage `<name>` has a key file `<name>.key.json` beside its folder (written atomically
after the folder was published, itself complete or absent): a digest of everything that shapes
the stage's bytes: its config with every checkpoint it reads replaced by the checkpoint's content
fingerprint (through the stat-keyed digest cache) and every earlier merge it reads by that merge's
key. A stage's key depends only on the checkpoints it and the merges it reads read, so a model
only a later merge reads may change and the stage stays valid.

The work folder keeps its owner record (io/owner.py): another process's folder is reused or
removed only when its owner died; this process's own only when no run here is using it. A run
takes a kept folder by renaming it into its own, so two runs never share one."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmerge_ray import __version__
from simmerge_ray.io.atomic import atomic_write_text, owned_temp_dir
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.io.owner import owned_by_this_process, owner_is_dead

log = logging.getLogger(__name__)

KEY_FORMAT = 2  # 2: keys of a graph of named merges (1: a plan's chain of steps)
KEY_SUFFIX = ".key.json"
# Where a mergekit config names a model (mergekit's ModelReference fields): an earlier merge's
# name is read there, and nowhere else. `tokenizer_source`/`source` may also be a keyword.
MODEL_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})
TOKENIZER_KEYWORDS = frozenset({"base", "union"})

_ACTIVE: set[str] = set()  # work folders of the runs in progress in this process
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Stage:
    """One merge of a graph: `config` is a mergekit config naming an earlier stage's output by
    that stage's name where a model path goes (`deps`: those names)."""

    name: str  # its folder in the work folder (the final's is used in messages only)
    config: dict[str, Any]
    deps: tuple[str, ...]
    source: str  # names the stage in messages ("multi.yaml: document 2 ('a')", "plan step 1")


def model_refs(node: Any, at: str = "") -> list[tuple[str, str]]:
    """(field, value) of every string a config gives where a model goes ('models[0].model')."""
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{at}.{k}" if at else str(k)
            if k in MODEL_KEYS and isinstance(v, str):
                out.append((where, v))
            elif k != "parameters":
                out.extend(model_refs(v, where))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(model_refs(v, f"{at}[{i}]"))
    return out


def substitute_refs(node: Any, mapping: Mapping[str, Any]) -> Any:
    """The config with every model reference found in `mapping` replaced by its value."""
    if isinstance(node, dict):
        return {k: (mapping.get(v, v) if k in MODEL_KEYS and isinstance(v, str)
                    else v if k == "parameters" else substitute_refs(v, mapping)) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_refs(v, mapping) for v in node]
    return node


def resolve_local(ref: str, root: Path | None) -> Path | None:
    """The checkpoint a reference names as MergeSpec resolves it (as given, else under `root`)."""
    for cand in (Path(ref).expanduser(), (Path(root) / ref) if root else None):
        if cand is not None and cand.exists():
            return cand.resolve()
    return None


class StageKeys:
    """The content key of each stage's output, computed when first asked for (a stage's key reads
    only the fingerprints of the checkpoints it and the stages it reads merge). `fingerprint`
    overrides how a checkpoint folder is fingerprinted (a plan trusts its recorded ones)."""

    def __init__(self, stages: Sequence[Stage], root: Path | None, seed: int, compute_dtype: str | None,
                 allow_nonfinite: bool, fingerprint: Callable[[Path], str] | None = None) -> None:
        self._stages = {s.name: s for s in stages}
        self._root = root
        # Everything else that changes a stage's bytes: DARE's seed, the compute dtype, whether
        # non-finite values were let through, and the engine's version.
        self._common = {"format": KEY_FORMAT, "seed": seed, "compute_dtype": compute_dtype,
                        "allow_nonfinite": allow_nonfinite, "engine": __version__}
        self._fingerprint_of = fingerprint or (lambda p: Checkpoint.open(p).fingerprint())
        self._fingerprints: dict[Path, str] = {}
        self._keys: dict[str, str] = {}

    def _fingerprint(self, path: Path) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = self._fingerprint_of(path)
        return self._fingerprints[path]

    def _ref(self, key: str, value: str) -> Any:
        if value in self._stages:
            return {"merge": self.key(value)}
        if key in ("tokenizer_source", "source") and value in TOKENIZER_KEYWORDS:
            return value
        path = resolve_local(value, self._root)
        return {"checkpoint": self._fingerprint(path)} if path is not None else value

    def _by_content(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (self._ref(k, v) if k in MODEL_KEYS and isinstance(v, str)
                        else v if k == "parameters" else self._by_content(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._by_content(v) for v in value]
        return value

    def key(self, name: str) -> str:
        """The stage's key, chained to the keys of the stages it reads."""
        if name not in self._keys:
            payload = {**self._common, "config": self._by_content(self._stages[name].config)}
            self._keys[name] = json_digest(payload)
        return self._keys[name]


def work_prefix(out: Path) -> str:
    """The name prefix of `out`'s work folders (`.NAME.plan-`), beside it."""
    return f".{Path(out).name}.plan-"


def stage_folder(work: Path, name: str) -> Path:
    return Path(work) / name


def key_file(work: Path, name: str) -> Path:
    return Path(work) / f"{name}{KEY_SUFFIX}"


def record_stage(work: Path, name: str, key: str) -> None:
    """Write the stage's key beside its published folder (atomically: a key file read is whole)."""
    atomic_write_text(key_file(work, name), json.dumps({"stage": name, "key": key}))


def recorded_key(work: Path, name: str) -> str | None:
    """The stage's recorded key; None when its folder or key file is missing or unreadable."""
    if not stage_folder(work, name).is_dir():
        return None
    try:
        record = json.loads(key_file(work, name).read_text())
    except (OSError, ValueError):
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, str) else None


def kept_stages(work: Path) -> list[str]:
    """The stages of `work` with a folder and a readable key, by name."""
    try:
        names = sorted(p.name[:-len(KEY_SUFFIX)] for p in Path(work).iterdir() if p.name.endswith(KEY_SUFFIX))
    except OSError:
        return []
    return [n for n in names if recorded_key(work, n) is not None]


def stages_to_run(stages: Sequence[Stage], available: Iterable[str]) -> tuple[list[Stage], set[str]]:
    """The stages a run makes, in order (the last, the final, always), and the available ones it
    reads instead of making them: a stage runs when a running one reads it and it is not available."""
    have = set(available)
    needed, reused = {stages[-1].name}, set()
    for s in reversed(stages):
        if s.name not in needed:
            continue
        for d in s.deps:
            if d in have:
                reused.add(d)
            else:
                needed.add(d)
    return [s for s in stages if s.name in needed], reused


def _left_behind(folder: Path) -> bool:
    """Whether `folder` is a work folder no run uses: its owner died, or it is this process's and
    no run of this process holds it (a failed run in a process that goes on)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if owner_is_dead(folder):
        return True
    with _ACTIVE_LOCK:
        return str(folder) not in _ACTIVE and owned_by_this_process(folder)


def _take(folder: Path, work: Path) -> Path | None:
    """Rename `folder` into `work` (ours): atomic, so of two runs only one gets it; None when
    another run took it first."""
    taken = Path(work) / f".taken-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, taken)
    except OSError:
        return None
    return taken


def adopt_kept(out: Path, work: Path, stages: Sequence[Stage], keys: StageKeys,
               describe: Callable[[list[str]], str]) -> set[str]:
    """Move the reusable stages of left-behind work folders of `out` into `work` (only those the
    run reads instead of making), and remove the left-behind folders (another graph's, a changed
    model's, a killed run's). Folders a live run owns, and folders without a readable owner
    record, are left alone. Returns the stages this run reuses; `describe` names them in the log."""
    # exactly owned_temp_dir's names: `.a.plan-1234abcd`, not the work folder of an --out `a.plan-x`
    pattern = re.compile(re.escape(work_prefix(out)) + r"[0-9a-f]{8}")
    try:
        candidates = sorted(p for p in Path(out).parent.iterdir()
                            if pattern.fullmatch(p.name) and p != work and _left_behind(p))
    except OSError:
        return set()
    names = {s.name for s in stages[:-1]}
    taken: list[tuple[Path, Path]] = []  # (left-behind folder, where it is now)
    found: dict[str, Path] = {}  # stage -> the taken folder holding a valid copy
    for folder in candidates:
        moved = _take(folder, work)
        if moved is None:
            continue
        taken.append((folder, moved))
        for name in kept_stages(moved):
            if name in names and name not in found and recorded_key(moved, name) == keys.key(name):
                found[name] = moved
    _, reused = stages_to_run(stages, found)
    sources: set[Path] = set()
    for name in sorted(reused):
        os.rename(stage_folder(found[name], name), stage_folder(work, name))
        os.rename(key_file(found[name], name), key_file(work, name))
        sources.add(found[name])
    for folder, moved in taken:
        if moved in sources:
            log.warning("%s: resuming %s (kept in %s, moved to %s)", out,
                        describe(sorted(n for n in reused if found[n] == moved)), folder, work)
        else:
            log.warning("removed %s, left by an earlier run of this --out and not reusable", folder)
        shutil.rmtree(moved, ignore_errors=True)
    return reused


def new_work_folder(out: Path) -> Path:
    """A new owned work folder for `out`, marked in use by this run before any other thread of
    this process can see it (release it with `release`)."""
    with _ACTIVE_LOCK:
        work = owned_temp_dir(Path(out).parent, work_prefix(out))
        _ACTIVE.add(str(work))
    return work


def release(work: Path) -> None:
    """This run no longer uses `work`: a later run of this process may resume from it."""
    with _ACTIVE_LOCK:
        _ACTIVE.discard(str(work))
