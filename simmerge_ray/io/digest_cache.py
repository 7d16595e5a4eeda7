"""Content digests: of large files, remembered by (path, size, mtime) so each file is hashed once,
and of the arrays a cache entry stores (checked when the entry is read back)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.file_lock import exclusive_lock
from simmerge_ray.lazy_torch import torch

log = logging.getLogger(__name__)
CHUNK = 16 * 1024 * 1024


def cache_root() -> Path:
    """Where the project keeps caches (override with SIMMERGE_CACHE)."""
    return Path(os.environ.get("SIMMERGE_CACHE", Path.home() / ".cache" / "simmerge"))


def json_digest(payload: object, size: int = 16, default: Callable[[object], object] | None = None) -> str:
    """blake2b (`size` bytes, hex) of a JSON-able payload with sorted keys: a cache key or content
    digest. `default` serialises what JSON cannot (e.g. str)."""
    return hashlib.blake2b(json.dumps(payload, sort_keys=True, default=default).encode(), digest_size=size).hexdigest()


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed of (seed, name): each tensor's random draws are its own, whichever worker
    makes them and in whatever order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}|{name}".encode(), digest_size=8).digest(), "little") >> 1


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """blake2b of named arrays (names, dtypes, shapes and bytes), independent of their order."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")  # no copy; same bytes as a.tobytes()
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, "torch.Tensor"]) -> str:
    """arrays_digest of named tensors, each hashed as its raw bytes (so any dtype, bfloat16
    included), its dtype and shape in the name."""
    return arrays_digest({f"{k}|{t.dtype}|{tuple(t.shape)}": t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                          for k, t in tensors.items()})


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes; a file unchanged since the last call is not read again. Unchanged
    means the same inode, size, mtime and ctime: fine-tunes of one architecture have one size, and
    an archive unpacked over a file can give it the old mtime, but not the old ctime, which only
    the kernel sets (any write, rename or replacement moves it)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    store = cache_root() / "file_digests.json"
    known = _load(store)
    if key in known:
        return known[key]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    store.parent.mkdir(parents=True, exist_ok=True)
    # Threads and processes (Ray actors hashing side by side) each add their entry to what is on
    # disk now, so no one's write drops another's.
    with exclusive_lock(store.with_name(store.name + ".lock")):
        known = _load(store)
        known[key] = digest
        atomic_write_text(store, json.dumps(known))
    return digest


def _load(store: Path) -> dict[str, str]:
    """The remembered digests; an unreadable store (truncated, corrupt) is empty, so every
    digest is computed again and the store is rewritten whole, atomically."""
    try:
        known = json.loads(store.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s: unreadable digest cache (%s); starting it afresh", store, e)
        return {}
    if not isinstance(known, dict) or not all(isinstance(v, str) for v in known.values()):
        log.warning("%s: malformed digest cache; starting it afresh", store)
        return {}
    return known
