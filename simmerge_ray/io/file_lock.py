"""An exclusive lock between processes: a POSIX record lock on a lock file (honoured across NFSv4
clients, unlike flock there), for read-modify-write of files that several processes share."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if absent; its folder must exist, else
    FileNotFoundError before anything is locked). A POSIX lock belongs to the process and closing
    any descriptor of the file drops it: never nest two on one file in one process."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
