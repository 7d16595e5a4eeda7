"""On-disk cache of probe outputs for one (model fingerprint, probe-set digest, settings) key.

    <root>/<key>/meta.json                       what the key stands for
    <root>/<key>/chunk-<run>-<seq>.safetensors   records of one batch: "<probe>/<field>" tensors,
                                                 header metadata "probe_ids" lists the probes,
                                                 "digest" the digest of every tensor's bytes,
                                                 "key" the entry it was written for
Chunks are written by the actors, each complete batch atomically (temp file + rename), so an
interrupted run keeps every finished batch and a rerun computes only the probes not in a chunk.
A chunk or meta.json that cannot be read (truncated, corrupt), or a chunk whose tensors do not
match their digest (bytes damaged under a readable header), or one written for another key (a
chunk moved between entries: its records are another model's), is a miss: logged with its path,
removed, and its probes computed again. Chunks written before the digest or the key existed are
trusted.
So is a chunk whose records do not fit the key's probes (RecordShapes: another probe set's, a
field missing), and an entry whose meta.json names another model, probe set or settings (a
folder copied over this key's) loses its chunks before they are read.
The folder must be reachable by every node that runs actors (as the checkpoints must be).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.atomic import atomic_file, atomic_write_text
from simmerge_ray.io.digest_cache import tensors_digest

log = logging.getLogger(__name__)

META = "meta.json"
CHUNK_GLOB = "chunk-*.safetensors"


# The meta.json fields a cache key stands for: an entry whose meta.json names others holds
# another model's or probe set's outputs (a folder copied or renamed), never to be read as this key's.
IDENTITY = ("fingerprint", "probe_digest", "settings")


@dataclass(frozen=True)
class RecordShapes:
    """What every record of a key must look like (its probes' lengths, the logits' width, the
    settings): a chunk whose records do not fit (another probe set's, a field missing) is a miss."""

    lengths: tuple[int, ...]  # tokens per probe
    vocab_size: int
    full_vocab_limit: int
    top_k: int
    attn_max_length: int

    def problem(self, pid: int, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why one probe's record (field -> shape) does not fit, else None."""
        if not 0 <= pid < len(self.lengths):
            return f"probe {pid} is not one of the {len(self.lengths)} probes"
        t, v = self.lengths[pid], self.vocab_size
        ta = min(t, self.attn_max_length)
        if v <= self.full_vocab_limit:
            want: dict[str, tuple[int, ...] | None] = {"logp": (t, v)}
        else:
            k = min(self.top_k, v)
            want = {"topk_idx": (t, k), "topk_logp": (t, k), "tail_logmass": (t,)}
        layers = shapes.get("hidden", (0,))[0]
        want |= {"hidden": None, "attn": (layers, ta, ta)}
        if set(shapes) != set(want):
            return f"probe {pid} has fields {sorted(shapes)}, expected {sorted(want)}"
        for name, shape in want.items():
            got = shapes[name]
            if (shape is None and len(got) != 2) or (shape is not None and got != shape):
                return f"probe {pid}: {name} has shape {list(got)}, expected {list(shape) if shape else '[layers, width]'}"
        return None


class ProbeCache:
    """Reader and writer of one key's chunk files; with `shapes`, a reader that checks every
    record against them (the driver's: the actors that write chunks need not)."""

    def __init__(self, root: Path, shapes: RecordShapes | None = None) -> None:
        self.root = Path(root)
        self.shapes = shapes
        self._where: dict[int, Path] = {}
        self._verified: set[tuple[Path, int, int]] = set()  # (path, size, mtime) whose bytes match

    # ---- writing -------------------------------------------------------------------------
    def check_kind(self) -> None:
        """The entry's folder and meta.json, where present, are a folder and a file: anything else
        there is not something this cache wrote, so it is named, not deleted."""
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a folder, where the probe cache keeps an entry; remove it")
        if (self.root / META).exists() and not (self.root / META).is_file():
            raise CheckpointError(f"{self.root / META}: not a file, where a probe-cache entry keeps its {META}; "
                                  f"remove it")

    def holds(self, meta: dict) -> bool:
        """Every probe of `meta`'s key already here, under a meta.json naming that key (read only:
        nothing is removed or rewritten, so a run refused next leaves the entry as it was)."""
        try:
            old = json.loads((self.root / META).read_text())
        except (OSError, ValueError):
            return False
        if not _same_key(old, meta):
            return False
        ids = set()
        for path in self.chunk_files():
            try:
                with safe_open(path, framework="pt") as f:
                    ids.update(_chunk_ids(f.metadata() or {}, self.root.name))
            except Exception:  # not plainly this key's: the run's reader decides what to do with it
                continue
        return ids >= set(range(int(meta["num_probes"])))

    def write_meta(self, meta: dict) -> None:
        """Write meta.json unless a readable one for the same key is there. An unreadable one, or
        one without the key's fields, is replaced (its chunks are checked as they are read); one
        naming another model, probe set or settings (IDENTITY) is another key's entry: its chunks
        are removed too, so they are computed again rather than read as this key's."""
        self.check_kind()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / META
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable probe-cache entry (%s); writing it again", path, e)
            else:
                keys = [k for k in IDENTITY if k in meta]
                if _same_key(old, meta):
                    return
                if isinstance(old, dict) and keys and all(k in old for k in keys):
                    differ = [k for k in keys if old[k] != meta[k]]
                    log.warning("%s: probe-cache entry written for another %s; its chunks are removed and run "
                                "again", path, "/".join(differ))
                    for chunk in self.chunk_files():
                        chunk.unlink(missing_ok=True)
                else:
                    log.warning("%s: lacks the fields of a probe-cache entry; writing it again", path)
        atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True))

    def write_chunk(self, records: dict[int, dict[str, torch.Tensor]], run_id: str, seq: int) -> Path:
        """Store a batch's records as one file, visible only once complete."""
        tensors = {f"{pid}/{name}": t for pid, rec in records.items() for name, t in rec.items()}
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"chunk-{run_id}-{seq:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"probe_ids": json.dumps(sorted(records)),
                                              "digest": tensors_digest(tensors), "key": self.root.name})
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
        """Probe ids per chunk file. A chunk whose header cannot be read, whose tensors do not
        match its digest, or that was written for another entry, is removed (its probes then count
        as not done, and are computed again); each chunk's bytes are checked once per reader."""
        out: dict[Path, list[int]] = {}
        for path in self.chunk_files():
            try:
                st = path.stat()
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata()
                    ids = _chunk_ids(meta, self.root.name)
                    if self.shapes is not None:
                        self._check_shapes(f, ids)
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
                log.warning("%s: unusable probe-cache chunk (%s); removed, its probes run again", path, e)
                path.unlink(missing_ok=True)
                continue
            out[path] = ids
        return out

    def _check_shapes(self, f: Any, ids: list[int]) -> None:  # f: an open safetensors.safe_open
        """Raise ValueError naming the first record of an open chunk that does not fit `shapes`
        (read from the header: no tensor is loaded)."""
        fields: dict[int, dict[str, tuple[int, ...]]] = {pid: {} for pid in ids}
        for key in f.keys():
            pid, _, name = key.partition("/")
            if not pid.isdigit() or int(pid) not in fields:
                raise ValueError(f"tensor {key!r} is not a record of its probes {ids}")
            fields[int(pid)][name] = tuple(f.get_slice(key).get_shape())
        for pid, shapes in fields.items():
            problem = self.shapes.problem(pid, shapes)
            if problem:
                raise ValueError(problem)

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


def _chunk_ids(header: dict[str, str], key: str) -> list[int]:
    """A chunk's probe ids from its header metadata; ValueError (or KeyError) naming what is
    wrong with one that is not plainly entry `key`'s."""
    ids = json.loads(header["probe_ids"])
    if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        raise ValueError(f"probe_ids is {ids!r}")
    if header.get("key", key) != key:
        raise ValueError(f"written for the entry {header['key']}, not this one")
    return ids


def _same_key(old: Any, meta: dict) -> bool:
    """An existing meta.json (`old`, as read) names the key `meta` stands for (IDENTITY)."""
    return isinstance(old, dict) and all(old.get(k) == meta[k] for k in IDENTITY if k in meta)


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


def discard_entries(cache_dir: Path, keys: Iterable[str]) -> int:
    """Remove the probe-cache entries `keys` of `cache_dir` (`probe --overwrite`: the ones its run
    measures again; other runs' entries stay), each only if its meta.json is this cache's, and
    then only its meta.json and chunk files; anything else there is left alone. Returns the count."""
    removed = 0
    for meta in sorted(m for m in (Path(cache_dir) / k / META for k in set(keys)) if m.is_file() and _is_entry(m)):
        for f in [*meta.parent.glob(CHUNK_GLOB), *meta.parent.glob(".chunk-*.tmp"), meta]:
            f.unlink(missing_ok=True)
        try:
            meta.parent.rmdir()
        except OSError:
            pass  # holds something that is not ours: kept
        removed += 1
    return removed
