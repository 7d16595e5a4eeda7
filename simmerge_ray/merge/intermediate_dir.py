"""`merge --intermediate-dir DIR` for a multi-document config: each named merge's output is
written to DIR/<name> and kept after the run, where mergekit-multi's `--intermediate-dir` puts it.

mergekit-multi (its default `--lazy`) skips a merge whose folder already holds a config.json and
weights, whatever wrote them and from what. simmerge reuses DIR/<name> only when it can prove the
folder is the merge the config asks for now: its record DIR/<name>.key.json, written after the
folder was published whole, holds the stage's key (merge/resume.py: the same configs over the
very same model files) and the identity of the folder's own files (stat only), so a folder
edited or replaced since is not taken for it. A DIR/<name> that cannot be proven so is never
overwritten silently: a folder simmerge did not write (mergekit-multi's, a user's) is refused,
and one simmerge wrote for other configs or files is replaced only with --overwrite. Nothing
in DIR is ever removed but a folder that --overwrite replaces (atomic_output_dir)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.out_checks import MARKER, check_creatable, check_not_input, check_replaceable, real_path
from simmerge_ray.merge.resume import (Stage, StageKeys, checkpoint_identity, key_file, read_record, stage_folder,
                                       stages_to_run)

log = logging.getLogger(__name__)

OPTION = "--intermediate-dir"


def record_kept(folder: Path, name: str, key: str) -> None:
    """Record that DIR/<name> is the stage of `key`, with its files' identity as published."""
    atomic_write_text(key_file(folder, name), json.dumps(
        {"stage": name, "key": key, "files": checkpoint_identity(stage_folder(folder, name))}))


def _record(folder: Path, name: str) -> dict | None:
    record = read_record(folder, name)
    return record if record is not None and record.get("stage") == name else None


def is_kept(folder: Path, name: str, key: str) -> bool:
    """Whether DIR/<name> is the output of the stage of `key`, untouched since it was recorded."""
    out = stage_folder(folder, name)
    if out.is_symlink() or not out.is_dir() or not (out / MARKER).is_file():
        return False
    record = _record(folder, name)
    return (record is not None and record.get("key") == key
            and record.get("files") == checkpoint_identity(out))


@dataclass(frozen=True)
class KeptPlan:
    """What a run with --intermediate-dir does: `todo` (the stages it merges, the final last),
    `reused` (kept in the folder and read instead), `replaced` (simmerge's stale outputs that
    --overwrite replaces)."""

    folder: Path
    todo: tuple[Stage, ...]
    reused: frozenset[str]
    replaced: frozenset[str]


def plan_kept(folder: Path, stages: Sequence[Stage], keys: StageKeys, *, out: Path, overwrite: bool,
              inputs: Sequence[str | os.PathLike] = ()) -> KeptPlan:
    """Check DIR and decide, before anything is written, which stages are reused and which are
    written there; every refusal is one line naming the folder (stat and key files only)."""
    folder = Path(folder)
    check_place(folder, out, stages, inputs)
    valid = {s.name for s in stages[:-1] if is_kept(folder, s.name, keys.key(s.name))}
    todo, reused = stages_to_run(stages, valid)
    replaced = set()
    for stage in todo[:-1]:
        target = stage_folder(folder, stage.name)
        rec = key_file(folder, stage.name)
        if rec.is_symlink() or rec.exists() and (not rec.is_file() or _record(folder, stage.name) is None):
            raise OutputError(f"{rec}: not a record simmerge wrote (merge {stage.name!r} is written beside it); "
                              f"move it out, or choose another {OPTION}")
        if not target.is_symlink() and (target / MARKER).is_file() and not overwrite:
            raise OutputError(f"{target}: written by simmerge for other configs or model files than merge "
                              f"{stage.name!r} reads now (or changed since): pass --overwrite to replace it, "
                              f"or choose another {OPTION}")
        check_replaceable(target, overwrite=overwrite, option=OPTION)
        check_creatable(target)
        if target.exists() and not target.is_symlink() and any(target.iterdir()):
            replaced.add(stage.name)
    return KeptPlan(folder, tuple(todo), frozenset(reused), frozenset(replaced))


def appeared_meanwhile(folder: Path, name: str) -> None:
    """After this run failed to publish DIR/<name>, which plan_kept found absent (or empty): when
    simmerge's output is there now, another run published it meanwhile (two runs sharing DIR); say
    so instead of advising --overwrite, which would replace that run's merge with the same one."""
    target = stage_folder(folder, name)
    if not target.is_symlink() and target.is_dir() and (target / MARKER).is_file():
        raise OutputError(f"{target}: another run published merge {name!r} in {folder} meanwhile (it was not there "
                          "when this run began); rerun the same command: it reuses that merge when it is the one "
                          "this config asks for (the same configs over the same model files)") from None


def check_place(folder: Path, out: Path, stages: Sequence[Stage], inputs: Sequence[str | os.PathLike]) -> None:
    """DIR is a folder (or to be made), not, holding or inside an input, nor --out or inside it
    (the final replaces --out whole); --out is no merge's folder in DIR."""
    if folder.is_symlink() and not folder.is_dir() or folder.exists() and not folder.is_dir():
        raise ConfigError(f"{OPTION} {folder}: not a folder")
    try:
        check_not_input(folder, inputs, noun="the folder")
    except ConfigError as e:
        raise ConfigError(f"{OPTION}: {e}") from None
    d, o = real_path(folder), real_path(out)
    if d == o or o in d.parents:
        raise ConfigError(f"{OPTION} {folder}: is or lies inside --out {out}, which the final merge replaces whole; "
                          "choose a folder beside it")
    for stage in stages[:-1]:
        if real_path(stage_folder(folder, stage.name)) == o:
            raise ConfigError(f"--out {out}: is where {OPTION} keeps merge {stage.name!r}; choose another --out")


def describe_reuse(plan: KeptPlan) -> str | None:
    """The log line of the stages a run reads from DIR instead of merging them."""
    if not plan.reused:
        return None
    names = ", ".join(repr(n) for n in sorted(plan.reused))
    return (f"reusing merge(s) {names} kept in {plan.folder} (written by simmerge for the same configs over the same "
            "model files, unchanged since)")
