"""Write-then-rename helpers: an output either exists complete or not at all, and a command
replaces only an output folder it wrote itself (see out_checks)."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from simmerge_ray.errors import OutputError
from simmerge_ray.io.out_checks import (MARKER, check_output, check_replaceable, is_empty_folder, lists_its_files,
                                        marker_text)
from simmerge_ray.io.owner import OWNER_FILE, clean_stale, write_owner

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling `.<name>.<random>.tmp` to write; renamed onto `path` when the block
    ends, removed when it raises, so readers see the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and an atomic rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def publish_cache_entry(tmp: Path, target: Path, usable: Callable[[Path], bool]) -> None:
    """Rename the finished cache entry `tmp` to `target`. A concurrent twin (same key, so same
    content) may have published first: its entry is kept if `usable(target)`, else (a corrupt
    entry the reader refused) it is replaced; never a raw error from the race."""
    try:
        tmp.rename(target)
        return
    except OSError:
        if not target.exists():
            raise
    if usable(target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(target, trash)
    except FileNotFoundError:
        pass  # a twin removed it meanwhile
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a twin published a fresh entry meanwhile
    shutil.rmtree(trash, ignore_errors=True)


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder `parent/<prefix><random>` recording this process as its owner."""
    tmp = Path(parent) / f"{prefix}{uuid.uuid4().hex[:8]}"
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write_owner(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{tmp.parent}: cannot create the output there: {e.strerror or e}") from None
    return tmp


def missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet, deepest first: a failed run creates them
    for its temporary folder and removes them again, leaving the tree as it found it."""
    missing = []
    for parent in Path(out).parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                      option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds.

    `out` is checked first (out_checks.check_output: not an input, not the current folder, an
    existing one replaced only with `overwrite`, only if its MARKER lists everything in it).
    When the block succeeds, MARKER records what it wrote. Temporary folders of killed runs
    beside `out` are removed. On failure the temporary folder is removed and any previous `out`
    is left untouched. `option` is the flag that names `out` in the errors' advice.
    """
    out = check_output(out, overwrite=overwrite, inputs=inputs, option=option)
    clean_stale(out.parent, (f".{out.name}.tmp-", f".{out.name}.old-"))
    made = missing_parents(out)
    tmp = owned_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        (tmp / MARKER).write_text(marker_text(tmp))
        check_replaceable(out, overwrite=overwrite, option=option)  # again: it may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # deepest first; one something else has written into since stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    if is_empty_folder(out):
        os.replace(tmp, out)  # a rename over an empty folder
    elif out.exists() and not lists_its_files(out):
        # An older simmerge's output: its marker does not say what is simmerge's, so it is kept
        # aside whole rather than deleted.
        kept = out.parent / f"{out.name}.kept-{uuid.uuid4().hex[:8]}"
        os.replace(out, kept)
        os.replace(tmp, out)
        log.warning("%s: replaced an output written by an older simmerge, which did not list its files; the "
                    "old folder is kept at %s (remove it once nothing of yours is in it)", out, kept)
    elif out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        write_owner(trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    (out / OWNER_FILE).unlink()  # after the rename: a run killed before it leaves a cleanable folder
