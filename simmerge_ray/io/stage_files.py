"""Files of one stage in a folder that several stages share (structural and functional
features both write to `feats/`, next to the probe cache).

The folder itself is never replaced or removed. Each stage names the files it writes; they are
built in a temporary folder inside the shared one, then each moved into place by an atomic
rename. A file is replaced only if a simmerge stage wrote it (listed in a stage marker
`.simmerge-stage-<stage>.json`), so a stage never removes another stage's files, the probe
cache, or a file of the user's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from simmerge_ray.errors import OutputError
from simmerge_ray.io.atomic import atomic_write_text, owned_temp_dir
from simmerge_ray.io.out_checks import check_creatable, check_not_input
from simmerge_ray.io.owner import OWNER_FILE, clean_stale

STAGE_MARKER = ".simmerge-stage-{}.json"


def _marker(folder: Path, stage: str) -> Path:
    return folder / STAGE_MARKER.format(stage)


def _listed(folder: Path, stage: str) -> set[str]:
    try:
        return set(json.loads(_marker(folder, stage).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def stage_owned(folder: Path) -> set[str]:
    """Names of the files in `folder` that some simmerge stage wrote."""
    markers = Path(folder).glob(STAGE_MARKER.format("*"))
    return set().union(*(_listed(folder, m.name[len(".simmerge-stage-"):-len(".json")]) for m in markers))


def adopt_stage_files(out: Path, stage: str, names: Sequence[str]) -> None:
    """Record the existing `names` in `out` as `stage`'s: for a folder the stage wrote before it
    kept a marker, recognised by the caller from the files' content."""
    present = sorted(n for n in names if (Path(out) / n).is_file() and not (Path(out) / n).is_symlink())
    atomic_write_text(_marker(Path(out), stage), json.dumps({"files": sorted(_listed(Path(out), stage) | set(present))}))


def check_stage(out: Path, names: Sequence[str], *, replace: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, a stage whose files could not be written or would replace a file
    simmerge did not write (or, without `replace`, any existing one)."""
    out = Path(out)
    check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: not a folder")
    check_creatable(out / "x")
    owned = stage_owned(out) if out.is_dir() else set()
    for name in names:
        path = out / name
        if not path.exists() and not path.is_symlink():
            continue
        if not replace:
            raise OutputError(f"{path}: output already exists (pass --overwrite to replace it)")
        if name not in owned or path.is_symlink() or not path.is_file():
            raise OutputError(f"{path}: not written by simmerge; remove it yourself or choose another --out")


def remove_stage_file(out: Path, stage: str, name: str) -> bool:
    """Remove `out/name` if `stage` wrote it (a file listed in its marker; never anything else):
    for an output that has gone stale. Returns whether it was removed."""
    out, path = Path(out), Path(out) / name
    listed = _listed(out, stage)
    if name not in listed or path.is_symlink() or not path.is_file():
        return False
    atomic_write_text(_marker(out, stage), json.dumps({"files": sorted(listed - {name})}))
    path.unlink()
    return True


@contextmanager
def stage_files(out: Path, stage: str, names: Sequence[str], *, replace: bool,
                inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder inside `out` for the stage to write `names` into; on success
    move them into `out` (after recording them in the stage's marker), replacing only files a
    stage wrote."""
    out = Path(out)
    check_stage(out, names, replace=replace, inputs=inputs)
    clean_stale(out, (f".{stage}.tmp-",))
    tmp = owned_temp_dir(out, f".{stage}.tmp-")
    try:
        yield tmp
        made = sorted(p.name for p in tmp.iterdir() if p.name != OWNER_FILE)
        unexpected = sorted(set(made) - set(names))
        if unexpected:
            raise ValueError(f"stage {stage} wrote undeclared files {unexpected}")
        check_stage(out, made, replace=True)  # a file may have appeared meanwhile
        atomic_write_text(_marker(out, stage), json.dumps({"files": sorted(_listed(out, stage) | set(made))}))
        for name in made:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
