"""An exclusive lock between processes and between threads: a POSIX record lock on a lock file
(honoured across NFSv4 clients, unlike flock there), for read-modify-write of files that several
processes share, plus a per-file thread lock, since a POSIX lock belongs to the whole process."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from simmerge_ray.errors import CheckpointError, OutputError


class LockHeld(OutputError):
    """The lock is held by another process and the caller asked not to wait."""


@dataclass
class _Held:
    """One lock file's state in this process: the thread lock, and the descriptor that carries the
    POSIX lock while some thread holds it (with how deep that thread has nested)."""

    thread_lock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_REGISTRY_LOCK = threading.Lock()
_REGISTRY: dict[str, _Held] = {}


def _held(lock_file: Path) -> _Held:
    key = os.path.realpath(lock_file)
    with _REGISTRY_LOCK:
        return _REGISTRY.setdefault(key, _Held())


@contextmanager
def exclusive_lock(lock_file: Path, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if absent, with the permissions the umask
    leaves, so that other users of a shared folder can lock it too) against other processes and
    other threads of this one. Nesting in one thread is allowed: the inner use neither opens nor
    closes the file (closing any descriptor of a file drops the process's POSIX lock on it). A lock
    file that cannot be opened is one CheckpointError naming it. With `blocking` False, a lock held
    by another process raises LockHeld instead of waiting (another thread of this one is waited for:
    it holds the lock briefly)."""
    held = _held(lock_file)
    with held.thread_lock:
        if held.depth == 0:
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise CheckpointError(f"{lock_file}: cannot open the lock file ({e.strerror or e})") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException as e:
                os.close(fd)
                if isinstance(e, OSError) and not blocking:
                    raise LockHeld(f"{lock_file}: held by another process") from None
                raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                os.close(held.fd)  # releases the POSIX lock
                held.fd = None
