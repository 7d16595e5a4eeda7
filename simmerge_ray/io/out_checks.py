"""Checks of an output path, run before any work: a command never replaces, deletes or writes
into what it did not create.

An output folder that simmerge wrote carries MARKER, which lists every entry the command wrote
there; --overwrite replaces only such a folder, and only while it holds nothing else (a user's
notes, or a merge run into a plan folder, are never deleted with it). An output may not be,
hold or lie inside one of the command's inputs, nor be the current folder or one above it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.io.owner import OWNER_FILE, is_owner_record

MARKER = ".simmerge-output.json"
# Set by a job whose output is written to a staging folder and then published on this machine's
# disk (--out file:///abs/path): the command checks that final place against its inputs too.
PUBLISH_ENV = "SIMMERGE_PUBLISH_TO"
LOCK_FILE = ".simmerge-lock"  # a folder's lock (the bandit's state): bookkeeping like the marker, never listed
# An NFS client's name for a file removed while some process still holds it open (".nfs", then 24
# hex digits); the client deletes it itself at the last close. A bandit state saved over while
# another process reads it leaves one, which must not make the folder look like a user's.
_NFS_SILLY = re.compile(r"\.nfs[0-9a-f]{24}")


def folder_entries(folder: Path) -> list[str]:
    """Every entry below `folder` as a relative POSIX path, folders ending in '/', links not
    followed; the marker, the owner record and the lock file at the top, and NFS clients' files of
    removed open files anywhere, are left out."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / d).as_posix() + "/" for d in dirs]
        out += [(rel / f).as_posix() for f in files if not (root == str(folder) and f in (MARKER, OWNER_FILE, LOCK_FILE))
                and not _NFS_SILLY.fullmatch(f)]
    return sorted(out)


def marker_text(folder: Path) -> str:
    """The marker's content for a finished output folder: what simmerge wrote in it."""
    return json.dumps({"written_by": "simmerge", "files": folder_entries(folder)}, indent=0) + "\n"


def _marker_files(out: Path) -> set[str] | None:
    """What the output folder's marker says simmerge wrote; None when it lists nothing (an older
    simmerge's marker, or none)."""
    try:
        listed = json.loads((out / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(listed) if isinstance(listed, list) else None


def lists_its_files(out: Path) -> bool:
    """Whether the output folder's marker lists what simmerge wrote (older markers do not)."""
    return _marker_files(out) is not None


def _stranger(out: Path) -> str | None:
    """The first entry of `out` that its marker does not list ('' when the marker lists nothing:
    an older simmerge's), None when every entry is simmerge's."""
    known = _marker_files(out)
    if known is None:
        return ""
    return _foreign_bookkeeping(out) or next((e for e in folder_entries(out) if e not in known), None)


def _foreign_bookkeeping(out: Path) -> str | None:
    """The reserved name at the top of `out` (never listed) whose file does not hold what simmerge
    writes there: the bandit's lock is an empty file, an owner record one small JSON object.
    Anything else under those names is a user's."""
    lock, owner = out / LOCK_FILE, out / OWNER_FILE
    if lock.is_symlink() or lock.exists() and not (lock.is_file() and lock.stat().st_size == 0):
        return LOCK_FILE
    if owner.is_symlink() or owner.exists() and not (owner.is_file() and is_owner_record(owner)):
        return OWNER_FILE
    return None


def real_path(p: str | os.PathLike) -> Path:
    """`p` absolute, every link resolved (never raises, unlike Path.resolve on a loop)."""
    return Path(os.path.realpath(os.path.abspath(p)))


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike], *, noun: str = "the output") -> None:
    """Refuse an output that is, holds or lies inside an input (its replacement would delete
    the input, or its files would land among the input's); so too the place a job publishes
    the output to (PUBLISH_ENV). `noun` names `out` in the message."""
    inputs = list(inputs)
    published = os.environ.get(PUBLISH_ENV)
    for shown in (out, *([published] if published else [])):
        o = real_path(shown)
        for given in inputs:
            i = real_path(given)
            if o == i:
                raise ConfigError(f"{shown}: {noun} is the input {given}; choose a new folder")
            if o in i.parents:
                raise ConfigError(f"{shown}: {noun} holds the input {given}; choose a new folder")
            if i in o.parents:
                raise ConfigError(f"{shown}: {noun} lies inside the input {given}; choose a new folder")


def check_creatable(out: Path) -> None:
    """Refuse an output under a file or on a folder this process cannot write (a read-only
    mount): one line now, not an OSError traceback after the work."""
    probe = real_path(out).parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{out}: cannot create the output: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write in {probe} (read-only file system or no permission)")


def is_empty_folder(path: Path) -> bool:
    """A real folder with nothing in it (made for the output): replacing it loses nothing."""
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_replaceable(out: Path, *, overwrite: bool, option: str = "--out") -> None:
    """An existing `out` may be replaced only with `overwrite`, and only if simmerge wrote it (an
    empty folder is used as it is); what --overwrite could never replace is said so at once.
    `option` is the command's flag for `out`, which the advice names (bandit-init's is --state)."""
    o = real_path(out)
    if o == real_path(".") or o in real_path(".").parents:
        raise ConfigError(f"{out}: the output would replace the current folder; choose a new folder")
    if not out.exists() and not out.is_symlink() or is_empty_folder(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: not a folder simmerge wrote (a file or link); remove it yourself "
                          f"or choose another {option}")
    if not (out / MARKER).is_file():
        raise OutputError(f"{out}: not written by simmerge (no {MARKER}); --overwrite replaces only "
                          f"simmerge's outputs: remove it yourself or choose another {option}")
    stranger = _stranger(out)
    if stranger:  # "" is an older simmerge's output: atomic_output_dir keeps it aside, whole
        raise OutputError(f"{out}: holds {stranger}, which simmerge did not write there; --overwrite would delete "
                          f"it: move it out, or choose another {option}")
    if not overwrite:
        raise OutputError(f"{out}: output already exists (pass --overwrite to replace it)")


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 option: str = "--out") -> Path:
    """Every check of an output folder that a run will create or replace; returns it as a Path."""
    out = Path(out)
    check_not_input(out, inputs)
    check_replaceable(out, overwrite=overwrite, option=option)
    check_creatable(out)
    return out
