"""The structural pass's on-disk cache: Gram entries per model pair, and per-tensor results of
an unfinished pass. Every file is written atomically with a digest of its arrays; one that cannot
be read, carries no digest or whose digest does not match (truncated, corrupt, rewritten) is a
miss: logged with its path, removed, and computed again. A bad cache file never fails a run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from simmerge_ray.io.atomic import atomic_file
from simmerge_ray.io.digest_cache import arrays_digest, cache_root

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"


def save_entry(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` through a temporary sibling and a rename, with their digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(arrays, str(tmp), metadata={"digest": arrays_digest(arrays)})


def load_entry(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays stored at `path`; None when absent, unreadable, without a digest or not matching
    it (such a file is removed so that it is written again): a valid file holding wrong values
    would otherwise be served as features."""
    try:
        with safe_open(str(path), framework="np") as f:
            want = (f.metadata() or {}).get("digest")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        return None
    except Exception as e:  # the safetensors library raises its own SafetensorError
        return _miss(path, f"unreadable: {e}")
    if want is None:  # values rewritten by something else, or an entry of before the digest: unverifiable
        return _miss(path, "has no digest")
    if want != arrays_digest(arrays):
        return _miss(path, "digest mismatch")
    return arrays


def _miss(path: Path, why: str) -> None:
    log.warning("%s: Gram cache entry %s; removed, computing it again", path, why)
    path.unlink(missing_ok=True)
    return None


def gram_cache_root(root: Path | None = None) -> Path:
    """The folder of every Gram cache under `root` (default: this machine's cache_root())."""
    return (root or cache_root()) / "structural"


class GramCache:
    """Gram entries and sign counts per unordered pair of rows, keyed by fingerprints.

    One folder per reference (the base's fingerprint, or the first model's when there is no
    base; the centred basis depends on it) and one small safetensors file per pair holding one
    value per tensor. Models are identified by content, so moves, renames, reorderings and
    removals all hit the cache.
    """

    def __init__(self, ref_fingerprint: str, signed: bool, precision: str, root: Path | None = None) -> None:
        kind = "base" if signed else "first"
        self.dir = gram_cache_root(root) / CACHE_VERSION / f"{kind}-{precision}-{ref_fingerprint}"

    def path(self, k1: str, k2: str) -> Path:
        a, b = sorted((k1, k2))
        return self.dir / f"{a}__{b}.safetensors"

    def load(self, k1: str, k2: str, tensors: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The pair's arrays in the order of `tensors`, or None if any tensor is absent."""
        data = load_entry(self.path(k1, k2))
        if data is None:
            return None
        try:
            names = json.loads(data.pop("tensors").tobytes().decode())
        except (KeyError, ValueError) as e:
            return _miss(self.path(k1, k2), f"malformed ({e!r})")
        index = {n: i for i, n in enumerate(names)}
        if any(t not in index for t in tensors):
            return None
        pick = np.array([index[t] for t in tensors], dtype=np.int64)
        return {k: v[pick] for k, v in data.items()}

    def save(self, k1: str, k2: str, tensors: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        names = np.frombuffer(json.dumps(list(tensors)).encode(), dtype=np.uint8).copy()
        save_entry(self.path(k1, k2), {**arrays, "tensors": names})

    def work_dir(self, plan_digest: str) -> Path:
        """Per-tensor results of an unfinished pass, so a crashed pass resumes where it stopped."""
        return self.dir / f"work-{plan_digest}"

    @staticmethod
    def work_file(work: Path, tensor: str) -> Path:
        return work / f"{hashlib.blake2b(tensor.encode(), digest_size=8).hexdigest()}.safetensors"
