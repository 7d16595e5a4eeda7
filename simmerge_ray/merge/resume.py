"""Resume an interrupted run of several merges (a plan's steps, a multi-document mergekit config):
the intermediate outputs are kept in the run's work folder when a run fails, and the next run of
the same --out reuses those still valid.

Each kept stage `<name>` has a key file `<name>.key.json` beside its folder (written atomically
after the folder was published, itself complete or absent): a digest of everything that shapes
the stage's bytes: its config with every checkpoint it reads replaced by the identity of the
checkpoint's files and every earlier merge it reads by that merge's key. A stage's key depends
only on the checkpoints it and the merges it reads read, so a model only a later merge reads may
change and the stage stays valid.

A kept stage is a resume state for the same files on the same machine, not a cache shared across
places: a checkpoint is keyed by the identity of every file of it a merge reads or copies
(weights, index, config.json, generation_config.json, the tokenizer files): resolved path, size,
modification time, inode and change time, without reading a byte, so keying costs a fresh run
nothing. Any copy or edit of one of those files (`cp -p` and `rsync -a` included, which keep size
and mtime but not inode or ctime) makes the stages that read it run again: safe, never stale.

The work folder keeps its owner record (io/owner.py): another process's folder is reused or
removed only when its owner died; this process's own only when no run here is using it. Which
kept stages a run reuses is decided before anything moves (a key that cannot be computed fails
the run with every kept stage where it was); each reused stage is then renamed into the run's
own folder (atomic: of two runs only one gets it) with its key, and only then are the left-behind
folders removed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.atomic import atomic_write_text, owned_temp_dir
from simmerge_ray.io.checkpoint_files import INDEX_FILE, weight_files
from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.io.owner import owned_by_this_process, owner_is_dead
from simmerge_ray.io.side_files import TOKENIZER_FILES
from simmerge_ray.merge.model_refs import local_checkpoint, substitute_refs

log = logging.getLogger(__name__)

# 3: checkpoints keyed by their files' identity (2: by content fingerprint; 1: a plan's chain of steps)
KEY_FORMAT = 3
# The engine's part of every key: bump it when a merge method's numbers or the files of an output
# change, so that no stage an older engine kept is reused. 2: base-model names read under the full
# model's (GPT-2 as published); every vocabulary tensor mergekit declares (Falcon/BLOOM, GPT-NeoX,
# InternLM2, ChatGLM embeddings and heads, heads' biases) re-indexed by `tokenizer:`.
ENGINE_FORMAT = 2
KEY_SUFFIX = ".key.json"
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


# The files of a checkpoint folder a merge reads or copies beside its weight shards
# (merge/output_files.py, io/side_files.py): a missing one is recorded as absent.
SIDE_FILES = ("config.json", "generation_config.json", INDEX_FILE, *TOKENIZER_FILES)


def _file_identity(path: Path) -> dict[str, Any]:
    """Where a file is and which file it is, from its inode's metadata only (nothing is read)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return {"absent": str(path)}
    except OSError as e:  # a symlink loop, an I/O error: the stages reading it cannot be proven valid
        raise CheckpointError(f"{path}: cannot stat it to key the merges that read it "
                              f"({e.strerror or e})") from None
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def checkpoint_identity(path: Path) -> list[dict[str, Any]]:
    """The identity of every file of the checkpoint `path` (a folder, or a lone .safetensors
    file) that a merge reads or copies: weight shards (as Checkpoint.open picks them), the index,
    config.json, generation_config.json and the tokenizer files."""
    path = Path(path)
    if not path.is_dir():
        return [_file_identity(path)]
    return [_file_identity(path / name) for name in (*(weight_files(path) or ()), *SIDE_FILES)]


class StageKeys:
    """The key of each stage's output, computed when first asked for (a stage's key reads only
    the identities of the checkpoints it and the stages it reads merge)."""

    def __init__(self, stages: Sequence[Stage], root: Path | None, seed: int, compute_dtype: str | None,
                 allow_nonfinite: bool) -> None:
        self._stages = {s.name: s for s in stages}
        self._root = root
        # Everything else that changes a stage's bytes: DARE's seed, the compute dtype, whether
        # non-finite values were let through, and the engine's format.
        self._common = {"format": KEY_FORMAT, "seed": seed, "compute_dtype": compute_dtype,
                        "allow_nonfinite": allow_nonfinite, "engine": ENGINE_FORMAT}
        self._identities: dict[Path, list[dict[str, Any]]] = {}
        self._keys: dict[str, str] = {}

    def _identity(self, path: Path) -> list[dict[str, Any]]:
        if path not in self._identities:
            self._identities[path] = checkpoint_identity(path)
        return self._identities[path]

    def _ref(self, key: str, value: str, deps: tuple[str, ...]) -> Any:
        if value in deps:  # an earlier merge (never the final: nothing reads it)
            return {"merge": self.key(value)}
        if key in ("tokenizer_source", "source") and value in TOKENIZER_KEYWORDS:
            return value
        path = local_checkpoint(value, self._root)
        return {"checkpoint": self._identity(path)} if path is not None else value

    def key(self, name: str) -> str:
        """The stage's key, chained to the keys of the stages it reads."""
        if name not in self._keys:
            stage = self._stages[name]
            payload = {**self._common,
                       "config": substitute_refs(stage.config, lambda k, v: self._ref(k, v, stage.deps))}
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


def read_record(work: Path, name: str) -> dict | None:
    """The stage's key file as written (record_stage, intermediate_dir.record_kept); None when it
    is missing, unreadable or not a JSON object."""
    try:
        record = json.loads(key_file(work, name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def recorded_key(work: Path, name: str) -> str | None:
    """The stage's recorded key; None when its folder or key file is missing or unreadable."""
    if not stage_folder(work, name).is_dir():
        return None
    key = (read_record(work, name) or {}).get("key")
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
    reads instead of making them: a stage runs when a running one reads it and it is not available.
    A stage besides the final that no other reads (kept in --intermediate-dir, the only run that
    allows one) is wanted for itself: it runs unless available."""
    have = set(available)
    read = {d for s in stages for d in s.deps}
    unread = {s.name for s in stages[:-1] if s.name not in read}
    needed, reused = {stages[-1].name} | (unread - have), unread & have
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


def _claim(folder: Path, work: Path, name: str, key: str) -> bool:
    """Move the kept stage `name` of `folder` into `work` with its key; False when another run
    took it first. Atomic for the stage: a rename, then its key written in `work` even when the
    run is interrupted right after the rename, or, when that fails, the folder put back."""
    src, dst = stage_folder(folder, name), stage_folder(work, name)
    try:
        os.rename(src, dst)
    except OSError:
        return False
    finally:
        if dst.is_dir() and not key_file(work, name).exists():
            try:
                record_stage(work, name, key)
            except BaseException:
                os.rename(dst, src)  # where it was, beside its key: nothing lost
                raise
    try:
        key_file(folder, name).unlink(missing_ok=True)
    except OSError:
        pass  # a key without its folder is never read
    return True


def find_kept(out: Path, work: Path | None, stages: Sequence[Stage], keys: StageKeys
              ) -> tuple[list[Path], dict[str, Path]]:
    """The left-behind work folders of `out` (not `work`), and for each stage of `stages` one of
    them holding a valid copy (its recorded key is the stage's key). Stat and key files only:
    the dry run asks this too, to count the merges a run would resume from."""
    # exactly owned_temp_dir's names: `.a.plan-1234abcd`, not the work folder of an --out `a.plan-x`
    pattern = re.compile(re.escape(work_prefix(out)) + r"[0-9a-f]{8}")
    try:
        candidates = sorted(p for p in Path(out).parent.iterdir()
                            if pattern.fullmatch(p.name) and p != work and _left_behind(p))
    except OSError:
        return [], {}
    names = {s.name for s in stages[:-1]}
    found: dict[str, Path] = {}  # stage -> the left-behind folder holding a valid copy
    for folder in candidates:
        for name in kept_stages(folder):
            if name in names and name not in found and recorded_key(folder, name) == keys.key(name):
                found[name] = folder
    return candidates, found


def adopt_kept(out: Path, work: Path, stages: Sequence[Stage], keys: StageKeys,
               describe: Callable[[list[str]], str]) -> set[str]:
    """Move the reusable stages of left-behind work folders of `out` into `work` (only those the
    run reads instead of making), and remove the left-behind folders (another graph's, a changed
    model's, a killed run's). Folders a live run owns, and folders without a readable owner
    record, are left alone. Every key is computed before anything moves or goes: when one
    cannot be (an unreadable model file, Ctrl-C), every left-behind folder stays as it was.
    Returns the stages this run reuses; `describe` names them in the log."""
    candidates, found = find_kept(out, work, stages, keys)
    claimed: dict[str, Path] = {}  # stage -> the folder it was kept in, now in `work`
    while True:  # a stage another run took first is made here, and so may need the stages it reads
        _, reused = stages_to_run(stages, found)
        todo = sorted(reused - claimed.keys())
        if not todo:
            break
        for name in todo:
            if _claim(found[name], work, name, keys.key(name)):
                claimed[name] = found[name]
            else:
                del found[name]
    for folder in candidates:
        mine = sorted(n for n, f in claimed.items() if f == folder)
        if mine:
            log.warning("%s: resuming %s (kept in %s, moved to %s)", out, describe(mine), folder, work)
        moved = _take(folder, work)  # what it still holds is not reused: unneeded, or no longer valid
        if moved is None:
            continue
        if not mine:
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
