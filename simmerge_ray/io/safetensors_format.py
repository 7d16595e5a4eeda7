"""The safetensors file format: header parsing with validation, and a streaming writer.

We parse headers ourselves (8-byte little-endian length + JSON) so that a truncated or corrupt
file is reported by name before any tensor is read, and we write files tensor by tensor so a
merge never holds a whole output shard in memory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import CheckpointError, OutputError
from simmerge_ray.io.writeback import start_writeback

TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


class _TorchDtypes(Mapping):
    """dtype code -> torch dtype (or its inverse), built on first lookup: torch is imported only
    by a merge that uses it (see lazy_torch)."""

    def __init__(self, inverse: bool) -> None:
        self._inverse = inverse
        self._table: dict | None = None

    def _get(self) -> dict:
        if self._table is None:
            forward = {code: getattr(torch, name) for code, name in TORCH_NAMES.items()}
            self._table = {v: k for k, v in forward.items()} if self._inverse else forward
        return self._table

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(TORCH_NAMES)

    def __contains__(self, key) -> bool:
        return key in TORCH_NAMES if not self._inverse else key in self._get()


DTYPE_TO_TORCH: Mapping[str, torch.dtype] = _TorchDtypes(inverse=False)
TORCH_TO_DTYPE: Mapping[torch.dtype, str] = _TorchDtypes(inverse=True)
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
# Names users write in configs (mergekit style) -> safetensors dtype codes.
DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float64": "F64",
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit


def promoted(codes: Iterable[str]) -> str | None:
    """torch.promote_types over stored dtype codes, as mergekit aligns a tensor's inputs: one
    dtype stays itself, bf16 with fp16 (or either with float32) gives float32, float64 wins;
    None when any input is not a float."""
    found = set(codes)
    if not found or not found <= set(FLOAT_DTYPES):
        return None
    if len(found) == 1:
        return found.pop()
    return "F64" if "F64" in found else "F32"


def dtype_code(name: str) -> str:
    """Map a user dtype name ('bfloat16', 'BF16', 'fp32', 'torch.float16' as mergekit reads it, ...)
    to a safetensors dtype code."""
    if name in TORCH_NAMES:
        return name
    code = DTYPE_ALIASES.get(name.lower().removeprefix("torch."))
    if code is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_ALIASES)}")
    return code


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its shard file and byte range, as declared in the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], bytes]:
    """Parse and strictly validate a safetensors header; return (entries, metadata, raw bytes).

    At least as strict as the safetensors library: a bounded header of JSON with the documented
    shape only, known dtypes, integer offsets with 0 <= begin <= end, byte counts equal to
    dtype x shape, and ranges that neither overlap nor leave holes and tile the data area
    exactly (a truncated file is caught here). Every violation is a CheckpointError naming the
    file and the tensor, before any tensor is read.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, "
                    f"file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt safetensors header (does not start with '{{')")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + n
    entries = {name: _entry(path, name, spec, data_start) for name, spec in header.items()}
    _check_tiling(path, list(entries.values()), data_start, size)
    return entries, metadata, raw


def _is_int(x: object) -> bool:
    """A JSON integer that fits the library's usize (a bool is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64


def _entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    """One header entry, checked on its own: known dtype, integer shape and offsets, sizes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{where}: corrupt header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not integers 0 <= begin <= end")
    entry = TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])
    if entry.nbytes != entry.numel * DTYPE_BYTES[dtype]:
        raise CheckpointError(f"{where}: declares {entry.nbytes} bytes for shape {shape} {dtype}")
    return entry


def _check_tiling(path: Path, entries: list[TensorEntry], data_start: int, size: int) -> None:
    """The byte ranges must cover the data area exactly once: no overlap, no hole, no excess."""
    at, prev = data_start, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.end > size:
            raise CheckpointError(f"{path}: truncated: tensor {e.name!r} ends at byte {e.end} but the file has {size}")
        if e.begin < at:
            raise CheckpointError(f"{path}: tensor {e.name!r} overlaps tensor {prev!r} (bytes {e.begin}..{at})")
        if e.begin > at:
            raise CheckpointError(f"{path}: tensor {e.name!r} starts at byte {e.begin}, leaving a hole after "
                                  f"{'the header' if prev is None else repr(prev)} (byte {at})")
        at, prev = e.end, e.name
    if at != size:
        raise CheckpointError(f"{path}: {size - at} bytes after the last tensor"
                              f"{'' if prev is None else f' {prev!r}'} belong to no tensor")


@dataclass(frozen=True)
class FileLayout:
    """Where every tensor of a safetensors file will sit, known before any data is computed."""

    header: bytes  # the 8-byte length, the JSON header, its padding
    offsets: dict[str, int]  # absolute file offset of each tensor's first byte
    size: int  # total file size


def tensor_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor of `shape` stored as the dtype code `dtype` (exact: Python ints)."""
    nbytes = DTYPE_BYTES[dtype]
    for d in shape:
        nbytes *= d
    return nbytes


def file_layout(specs: list[tuple[str, tuple[int, ...], str]], metadata: dict[str, str] | None = None) -> FileLayout:
    """The layout of a file holding `specs` (name, shape, dtype code) in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    rel: dict[str, int] = {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return FileLayout(head, {k: len(head) + v for k, v in rel.items()}, len(head) + offset)


def preallocate(path: Path, layout: FileLayout) -> None:
    """Create `path` with its header and its full length, for RangeWriters to fill. The blocks
    are reserved up front where the file system can (posix_fallocate), so a disk too small for
    the output fails here, before any input is read, not hours into a merge."""
    try:
        with open(path, "wb") as f:
            f.write(layout.header)
            f.truncate(layout.size)
            try:
                os.posix_fallocate(f.fileno(), 0, layout.size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # unsupported: stay sparse
                    raise
    except OSError as e:
        raise OutputError(_write_failure(path, e, f"cannot reserve {layout.size} bytes")) from None


def _write_failure(path: Path, e: OSError, what: str) -> str:
    msg = f"{path}: {what}: {e.strerror or e}"
    if e.errno == errno.ENOSPC:
        msg += f" ({shutil.disk_usage(Path(path).parent).free / 1e9:.2f} GB free there)"
    return msg




class RangeWriter:
    """Writes byte ranges of a preallocated file: several workers fill one output file, each
    its own tensors or element ranges, at offsets fixed by the file's layout. Each range's
    writeback to disk starts as soon as it is written, overlapping the rest of the merge."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY)
        except FileNotFoundError:
            # The file was preallocated by the driver: absent here means this worker's node does
            # not see the driver's output folder.
            raise OutputError(f"{self.path}: the output file the driver created is not on this node ({socket.gethostname()}): "
                              "on a cluster, --out (or a job's --staging-dir) must be on storage every node mounts") from None

    def write_at(self, offset: int, part: "torch.Tensor | np.ndarray") -> None:
        """Write `part`'s bytes at `offset`: a tensor, or a contiguous numpy buffer (the torch-free
        linear path)."""
        if isinstance(part, np.ndarray):
            data = memoryview(part).cast("B")
        else:
            data = memoryview(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
        except OSError as e:
            raise OutputError(_write_failure(self.path, e, f"cannot write {len(data)} bytes at offset {offset}")) from None
        if done:
            start_writeback(self._fd, offset, done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    abort = close  # the caller owns the file (the merge removes its whole temporary folder)


class StreamingWriter:
    """Write a safetensors file one tensor at a time, in a declared order.

    The header is computed up front from the declared (name, shape, dtype) list, so each tensor
    can be written and dropped as soon as it is computed: memory stays at one tensor.
    """

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], str]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        layout = file_layout(self._specs, metadata)
        self._f: BinaryIO = open(self.path, "wb")
        self._f.write(layout.header)
        self._next = 0
        self._done = 0  # elements of the current tensor written so far

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor whole."""
        _, shape, _ = self._specs[self._next] if self._next < len(self._specs) else (None, None, None)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name!r} is {list(tensor.shape)}, declared {list(shape)}")
        self.write_part(name, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next elements (in flattened order) of the tensor being written; the
        tensor is complete once its declared number of elements has arrived."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name!r} is beyond the declared tensors")
        want_name, shape, dtype = self._specs[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        if TORCH_TO_DTYPE[part.dtype] != dtype:
            raise ValueError(f"{self.path}: tensor {name!r} part is {part.dtype}, declared {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        t = part.detach().cpu().contiguous().reshape(-1)
        if self._done + t.numel() > numel:
            raise ValueError(f"{self.path}: tensor {name!r} receives more than its {numel} elements")
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._done += t.numel()
        if self._done == numel:
            self._next += 1
            self._done = 0

    def close(self) -> None:
        if self._next != len(self._specs):
            missing = [s[0] for s in self._specs[self._next:]]
            self._f.close()
            raise ValueError(f"{self.path}: closed before writing {missing[:3]}...")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class BackgroundWriter:
    """Feeds a RangeWriter from one background thread, in submission order, so the next chunk
    is computed while this one is written.

    At most one write is left in flight when `write_at` returns: a caller that alternates two
    output buffers may refill one as soon as it has submitted the other.
    """

    def __init__(self, writer: RangeWriter) -> None:
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._pending: deque[Future] = deque()

    def write_at(self, offset: int, part: "torch.Tensor | np.ndarray") -> None:
        """Write `part` at `offset`; it must not change until the next call returns (or `close`)."""
        self._pending.append(self._pool.submit(self.writer.write_at, offset, part))
        while len(self._pending) > 1:
            self._pending.popleft().result()  # re-raises a failed write here

    def close(self) -> None:
        """Wait for every write, then close the file."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
            self.writer.close()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self.writer.abort()
