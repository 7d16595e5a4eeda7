"""The bandit's state folder.

    DIR/bandit.json   settings fixed at creation: encoder spec, feature table, ledger bounds
    DIR/state.npz     everything that changes: posteriors, generator state, pending decisions

`state.npz` is rewritten after every batch of mutations through a temporary sibling and one
`os.replace`, so a reader (or an actor restarted after a kill) sees either the previous or the
new state, never a mix. A writer holds the folder's lock (`folder_lock`) from its read to its
save, and knows whether another process saved since by the file it holds open (`SeenFile`). A
state with a NaN or Inf anywhere is never written, and refused when read. The JSON part of the
mutable state travels inside the npz as a uint8 array so the whole state is one file and one
rename.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from simmerge_ray.bandit.errors import NonFiniteStateError
from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.atomic import atomic_file, atomic_write_text
from simmerge_ray.io.file_lock import exclusive_lock
from simmerge_ray.io.out_checks import LOCK_FILE

SETTINGS_FILE = "bandit.json"
SETTINGS_VERSION = 1  # the layout of bandit.json this code writes and reads
STATE_FILE = "state.npz"
_META_KEY = "__meta__"


def write_settings(state_dir: Path, settings: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_dir / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def read_settings(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / SETTINGS_FILE
    if Path(state_dir).exists() and not Path(state_dir).is_dir():  # was ".../state.npz/bandit.json: no state"
        raise CheckpointError(f"{state_dir}: a file, not a bandit state folder (the folder `simmerge bandit-init` "
                              "created)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no bandit state here (create one with `simmerge bandit-init`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the bandit settings ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def write_state(state_dir: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Atomically replace DIR/state.npz with `meta` (JSON-able) and `arrays`."""
    if _META_KEY in arrays:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    bad = _first_nonfinite(meta, arrays)
    if bad is not None:
        raise NonFiniteStateError(f"{Path(state_dir) / STATE_FILE}: not saved, {bad} is not finite "
                                  "(the saved state is unchanged)")
    buf = io.BytesIO()
    payload = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(buf, **{_META_KEY: payload}, **arrays)
    path = Path(state_dir) / STATE_FILE
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def remove_stale_temporaries(state_dir: Path) -> None:
    """Drop temporaries left by a writer killed mid-write (call only when no writer is active)."""
    for tmp in Path(state_dir).glob(f".{STATE_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)


def read_state(state_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing bandit state file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable bandit state ({type(e).__name__}: {e})") from None
    bad = _first_nonfinite(meta, arrays)
    if bad is not None:
        raise CheckpointError(f"{path}: {bad} is not finite; this bandit state is unusable "
                              "(restore it from a backup or create a new one with `simmerge bandit-init`)")
    return meta, arrays


def _first_nonfinite(meta: Any, arrays: dict[str, np.ndarray]) -> str | None:
    """Name of the first NaN/Inf in the state (an array, or a number inside the JSON part), or None."""
    for name, arr in arrays.items():
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return f"array {name!r}"
    stack: list[tuple[str, Any]] = [("meta", meta)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not np.isfinite(value):
            return where
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    return None


@contextmanager
def folder_lock(state_dir: Path) -> Iterator[None]:
    """The state folder's lock, held by a batch of requests from its read to its save: two
    processes over one folder (two `serve`s, or a RayService's old and new cluster during an
    upgrade) then take turns instead of overwriting each other."""
    if not state_dir.is_dir():
        raise CheckpointError(f"{state_dir}: the bandit state folder is gone (removed, or being replaced by "
                              "`simmerge bandit-init --overwrite`)")
    with exclusive_lock(state_dir / LOCK_FILE):
        yield


class SeenFile:
    """The state file this process last read or wrote, held open: its inode cannot be reused by a
    newer file while it is open, so a different inode at the path means another process saved
    (a stamp of inode, mtime and size alone can repeat across two saves); a changed mtime or size
    of the same inode means it was rewritten in place (e.g. a backup copied over it)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = open(path, "rb")  # noqa: SIM115 (held for the object's life; closed with it)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open the bandit state ({e.strerror or e})") from None
        st = os.fstat(self.file.fileno())
        self.mark = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> bool:
        """Whether the file at the path is still the one seen, unchanged."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino, now.st_mtime_ns, now.st_size) == self.mark

    def close(self) -> None:
        self.file.close()

    def __del__(self) -> None:  # a dropped BanditCore closes its file without a ResourceWarning
        if hasattr(self, "file"):
            self.file.close()


@contextmanager
def damaged(path: Path) -> Iterator[None]:
    """A state file that parses but lacks a field, or holds one of the wrong kind, is one
    CheckpointError naming the file and the field, not a KeyError from deep inside."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{path}: damaged bandit state (missing field {e.args[0]!r})") from None
    except (TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged bandit state ({e})") from None
