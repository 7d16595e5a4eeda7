"""The I/O floor of a merge: read every input file once and write the output's bytes once (synced).

No merge can take less time on the same machine than this, so merge benchmarks report each
tool's time as a multiple of it. As many threads as CPUs read the files and write the output's
ranges, each into one reused buffer (no allocation per block), so the floor uses the machine as
fully as a merge may; the written bytes are blocks read, so nothing is all zeros.

    python -m benchmarks.io_floor --out-bytes N --out DIR FILE...
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simmerge_ray.io.writeback import start_writeback

BLOCK = 2 * 1024**2  # cache-sized, as the merge engine's chunks


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's reused block buffer."""
    if not hasattr(_local, "view"):
        _local.view = memoryview(bytearray(BLOCK))
    return _local.view


def _read_all(path: Path, view: memoryview | None) -> int:
    view = view or _buffer()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while n := os.preadv(fd, [view], offset):
            offset += n
        return offset
    finally:
        os.close(fd)


def _write_range(fd: int, view: memoryview | None, start: int, end: int) -> None:
    view = view or _buffer()
    pos = start
    while pos < end:
        n = os.pwrite(fd, view[:min(BLOCK, end - pos)], pos)
        start_writeback(fd, pos, n)  # as the merge engine's writer does
        pos += n


def floor(files: list[Path], out_bytes: int, out_dir: Path, threads: int | None = None) -> dict:
    threads = threads or len(os.sched_getaffinity(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f".io-floor-{os.getpid()}.bin"  # a new file of its own: nothing else is touched
    t0 = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, out_bytes)  # blocks reserved up front, as the merge engine does
        step = -(-out_bytes // threads)
        with ThreadPoolExecutor(max_workers=threads) as pool:  # reads and writes overlap, as in a merge
            reads = [pool.submit(_read_all, f, None) for f in files]
            writes = [pool.submit(_write_range, fd, None, i * step, min(out_bytes, (i + 1) * step))
                      for i in range(threads)]
            read = sum(f.result() for f in reads)
            for w in writes:
                w.result()
        os.fsync(fd)
    finally:
        os.close(fd)
        target.unlink()
    return {"seconds": time.perf_counter() - t0, "bytes_read": read, "bytes_written": out_bytes, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-bytes", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    r = floor([Path(f) for f in args.files], args.out_bytes, Path(args.out))
    print(json.dumps(r))
    print(f"read {r['bytes_read'] / 1e9:.2f} GB, wrote {r['bytes_written'] / 1e9:.2f} GB in {r['seconds']:.2f} s "
          f"({r['threads']} threads)")


if __name__ == "__main__":
    main()
