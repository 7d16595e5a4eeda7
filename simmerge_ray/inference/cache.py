"""On-disk cache of probe outputs for one (model fingerprint, probe-set digest, settings) key.

    <root>/<key>/meta.json                       what the key stands for
    <root>/<key>/chunk-<run>-<seq>.safetensors   records of one batch: "<probe>/<field>" tensors,
                                                 header metadata "probe_ids" lists the probes,
                                                 "digest" the digest of every tensor's bytes
Chunks are written by the actors, each complete batch atomically (temp file + rename), so an
interrupted run keeps every finished batch and a rerun computes only the probes not in a chunk.
A chunk or meta.json that cannot be read (truncated, corrupt), or a chunk whose tensors do not
match their digest (bytes damaged under a readable header), is a miss: logged with its path,
removed, and its probes computed again. Chunks written before the digest existed are trusted.
The folder must be reachable by every node that runs actors (as the checkpoints must be).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.atomic import atomic_file, atomic_write_text
from simmerge_ray.io.digest_cache import tensors_digest

log = logging.getLogger(__name__)

META = "meta.json"
CHUNK_GLOB = "chunk-*.safetensors"


class ProbeCache:
    """Reader and writer of one key's chunk files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._where: dict[int, Path] = {}
        self._verified: set[tuple[Path, int, int]] = set()  # (path, size, mtime) whose bytes match

    # ---- writing -------------------------------------------------------------------------
    def write_meta(self, meta: dict) -> None:
        """Write meta.json unless a readable one is there (an unreadable one is replaced)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / META
        if path.exists():
            try:
                json.loads(path.read_text())
                return
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable probe-cache entry (%s); writing it again", path, e)
        atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True))

    def write_chunk(self, records: dict[int, dict[str, torch.Tensor]], run_id: str, seq: int) -> Path:
        """Store a batch's records as one file, visible only once complete."""
        tensors = {f"{pid}/{name}": t for pid, rec in records.items() for name, t in rec.items()}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"chunk-{run_id}-{seq:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"probe_ids": json.dumps(sorted(records)),
                                              "digest": tensors_digest(tensors)})
        return path

    # ---- reading -------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        try:
            return json.loads((self.root / META).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.root}: probe cache has no {META}; run `simmerge probe` first") from None

    def chunk_files(self) -> list[Path]:
        return sorted(self.root.glob(CHUNK_GLOB))

    def chunk_probe_ids(self) -> dict[Path, list[int]]:
        """Probe ids per chunk file. A chunk whose header cannot be read, or whose tensors do
        not match its digest, is removed (its probes then count as not done, and are computed
        again); each chunk's bytes are checked once per reader."""
        out: dict[Path, list[int]] = {}
        for path in self.chunk_files():
            try:
                st = path.stat()
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata()
                    ids = json.loads(meta["probe_ids"])
                    if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
                        raise ValueError(f"probe_ids is {ids!r}")
                    stamp = (path, st.st_size, st.st_mtime_ns)
                    if "digest" in meta and stamp not in self._verified:
                        if tensors_digest({k: f.get_tensor(k) for k in f.keys()}) != meta["digest"]:
                            raise ValueError("its tensors do not match their digest")
                        self._verified.add(stamp)
            except FileNotFoundError:
                continue  # removed meanwhile by a concurrent reader
            except (OSError, MemoryError) as e:  # the reader's trouble (I/O, memory), not the chunk's
                log.warning("%s: probe-cache chunk not readable now (%s); its probes run again, the file is kept", path, e)
                continue
            except Exception as e:  # the safetensors library raises its own SafetensorError
                log.warning("%s: unreadable probe-cache chunk (%s); removed, its probes run again", path, e)
                path.unlink(missing_ok=True)
                continue
            out[path] = ids
        return out

    def done_ids(self) -> set[int]:
        return {pid for ids in self.chunk_probe_ids().values() for pid in ids}

    def is_complete(self) -> bool:
        return (self.root / META).exists() and self.done_ids() >= set(range(self.meta["num_probes"]))

    def record(self, pid: int) -> dict[str, torch.Tensor]:
        """All stored tensors of one probe (the probe -> chunk index is rebuilt on a miss)."""
        if pid not in self._where:
            self._where = {p: path for path, ids in self.chunk_probe_ids().items() for p in ids}
        try:
            path = self._where[pid]
        except KeyError:
            raise CheckpointError(f"{self.root}: probe {pid} is not in the cache (run incomplete?)") from None
        prefix = f"{pid}/"
        try:
            with safe_open(path, framework="pt") as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # the safetensors library raises its own SafetensorError
            raise CheckpointError(f"{path}: unreadable probe-cache chunk ({e}); rerun to compute it again") from None


def _is_entry(meta: Path) -> bool:
    """A probe-cache entry: a folder named as settings.cache_key names them (24 hex digits) whose
    meta.json has the fields this cache writes. Any other `*/meta.json` (a user's experiment folder
    under a shared --cache, whatever its meta.json holds) is not ours."""
    if not _KEY_NAME.fullmatch(meta.parent.name):
        return False
    try:
        raw = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("num_probes"), int)  # what the cache reads back


_KEY_NAME = re.compile(r"[0-9a-f]{24}")


def discard_entries(cache_dir: Path) -> int:
    """Remove the probe-cache entries in `cache_dir` (folders whose meta.json is this cache's:
    their meta.json and chunk files only); anything else there is left alone. Returns the count."""
    removed = 0
    for meta in sorted(m for m in Path(cache_dir).glob(f"*/{META}") if _is_entry(m)):
        for f in [*meta.parent.glob(CHUNK_GLOB), *meta.parent.glob(".chunk-*.tmp"), meta]:
            f.unlink(missing_ok=True)
        try:
            meta.parent.rmdir()
        except OSError:
            pass  # holds something that is not ours: kept
        removed += 1
    return removed
