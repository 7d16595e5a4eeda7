"""An exclusive lock between processes: a POSIX record lock on a lock file (honoured across NFSv4
clients, unlike flock there), for read-modify-write of files that several processes share."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simmerge_ray.errors import CheckpointError


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if absent, with the permissions the umask
    leaves, so that other users of a shared folder can lock it too). A lock file that cannot be
    opened is one CheckpointError naming it. A POSIX lock belongs to the process and closing any
    descriptor of the file drops it: never nest two on one file in one process."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise CheckpointError(f"{lock_file}: cannot open the lock file ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
