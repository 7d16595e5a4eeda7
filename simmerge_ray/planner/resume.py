"""Resume an interrupted plan: a non-linear plan's intermediate steps are kept in its work folder
when a run fails, and the next run of the same --out reuses the longest prefix still valid.

Each kept step `step-<j>` has a key file `step-<j>.key.json` beside it (written atomically after
the step's folder was published, itself complete or absent): a digest of everything that shapes
the step's bytes, its inputs identified by content (checkpoint fingerprints, through the
stat-keyed digest cache), chained to the previous step's key. Step j's key depends only on the
models it and the earlier steps read, so a later model changing keeps it valid.

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
from pathlib import Path
from typing import Any

from simmerge_ray import __version__
from simmerge_ray.catalog import Catalog
from simmerge_ray.io.atomic import atomic_write_text, owned_temp_dir
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.digest_cache import json_digest
from simmerge_ray.io.owner import owned_by_this_process, owner_is_dead
from simmerge_ray.planner.plan import Plan

log = logging.getLogger(__name__)

KEY_FORMAT = 1
KEY_SUFFIX = ".key.json"
_PREVIOUS = "\0previous step"  # stands for step j-1's folder in the configs; no path holds a NUL
_STEP_RE = re.compile(r"step-(\d+)")

_ACTIVE: set[str] = set()  # work folders of the runs in progress in this process
_ACTIVE_LOCK = threading.Lock()


def work_prefix(out: Path) -> str:
    """The name prefix of `out`'s work folders (`.NAME.plan-`), beside it."""
    return f".{Path(out).name}.plan-"


def step_folder(work: Path, j: int) -> Path:
    return Path(work) / f"step-{j}"


def key_file(work: Path, j: int) -> Path:
    return Path(work) / f"step-{j}{KEY_SUFFIX}"


class StepKeys:
    """The content key of each intermediate step's output, computed when first asked for (a step's
    key reads only the fingerprints of the checkpoints it and the earlier steps merge)."""

    def __init__(self, plan: Plan, catalog: Catalog, out_dtype: str | None, seed: int,
                 compute_dtype: str | None, allow_nonfinite: bool) -> None:
        paths = {m.name: m.path for m in catalog.models}
        self._configs = plan.step_configs(paths, catalog.base, step_dir=_PREVIOUS)
        self._models = {str(paths[m]) for m in plan.models}
        self._base = str(catalog.base) if catalog.base is not None else None
        # Everything else that changes a step's bytes: the output dtype, DARE's seed, the compute
        # dtype, whether non-finite values were let through, and the engine's version.
        self._common = {"format": KEY_FORMAT, "out_dtype": out_dtype, "seed": seed, "compute_dtype": compute_dtype,
                        "allow_nonfinite": allow_nonfinite, "engine": __version__}
        self._fingerprints: dict[str, str] = {}
        self._recorded = {str(paths[m]): rec for m, rec in plan.checkpoints.items() if m in paths}
        self._keys: list[str] = []

    def _fingerprint(self, path: str) -> str:
        """The checkpoint's fingerprint: the plan's record of it while its files' stat signature is
        the recorded one (check_unchanged vouched for it; a 111B checkpoint is not read twice),
        else computed through the stat-keyed digest cache."""
        if path not in self._fingerprints:
            ck, rec = Checkpoint.open(Path(path)), self._recorded.get(path, {})
            same = bool(rec.get("fingerprint")) and ck.stat_signature() == rec.get("signature")
            self._fingerprints[path] = rec["fingerprint"] if same else ck.fingerprint()
        return self._fingerprints[path]

    def _by_content(self, value: Any) -> Any:
        """The config with every checkpoint path replaced by its content fingerprint."""
        if isinstance(value, dict):
            return {k: self._by_content(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._by_content(v) for v in value]
        if value == _PREVIOUS:
            return {"previous_step": True}
        if isinstance(value, str) and value in self._models:
            return {"checkpoint": self._fingerprint(value)}
        if isinstance(value, str) and value == self._base:
            return {"base": self._fingerprint(value)}
        return value

    def key(self, j: int) -> str:
        """Step j's key (1-based), chained to step j-1's."""
        while len(self._keys) < j:
            i = len(self._keys)
            payload = {**self._common, "step": i + 1, "config": self._by_content(self._configs[i]),
                       "previous": self._keys[-1] if self._keys else None}
            self._keys.append(json_digest(payload))
        return self._keys[j - 1]


def record_step(work: Path, j: int, key: str) -> None:
    """Write step j's key beside its published folder (atomically: a key file read is whole)."""
    atomic_write_text(key_file(work, j), json.dumps({"step": j, "key": key}))


def recorded_key(work: Path, j: int) -> str | None:
    """Step j's recorded key; None when its folder or key file is missing or unreadable."""
    if not step_folder(work, j).is_dir():
        return None
    try:
        record = json.loads(key_file(work, j).read_text())
    except (OSError, ValueError):
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, str) else None


def kept_step(work: Path, keys: StepKeys, steps: int) -> int:
    """The deepest intermediate step (1..steps-1) of `work` whose recorded key is this run's; 0 when
    none. The keys chain, so a match stands for every step before it too."""
    try:
        found = sorted((int(m.group(1)) for p in Path(work).iterdir() if (m := _STEP_RE.fullmatch(p.name))),
                       reverse=True)
    except OSError:
        return 0
    for j in found:
        if j < steps and (rec := recorded_key(work, j)) is not None and rec == keys.key(j):
            return j
    return 0


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


def adopt_kept(out: Path, work: Path, keys: StepKeys, steps: int) -> int:
    """Move the deepest reusable step of a left-behind work folder of `out` into `work`, and remove
    the other left-behind ones (another plan's, a changed model's, a killed run's). Folders a live
    run owns, and folders without a readable owner record, are left alone. Returns the step this
    run resumes after (0: none)."""
    # exactly owned_temp_dir's names: `.a.plan-1234abcd`, not the work folder of an --out `a.plan-x`
    name = re.compile(re.escape(work_prefix(out)) + r"[0-9a-f]{8}")
    try:
        candidates = sorted(p for p in Path(out).parent.iterdir()
                            if name.fullmatch(p.name) and p != work and _left_behind(p))
    except OSError:
        return 0
    ranked = sorted(((kept_step(p, keys, steps), p) for p in candidates), key=lambda t: -t[0])
    resumed = 0
    for j, folder in ranked:
        taken = _take(folder, work)
        if taken is None:
            continue
        if j and not resumed:
            os.rename(step_folder(taken, j), step_folder(work, j))
            os.rename(key_file(taken, j), key_file(work, j))
            resumed = j
            log.warning("%s: resuming the plan after step %d of %d (kept in %s, moved to %s)",
                        out, j, steps, folder, work)
        else:
            log.warning("removed %s, left by an earlier run of this plan's --out and not reusable", folder)
        shutil.rmtree(taken, ignore_errors=True)
    return resumed


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
