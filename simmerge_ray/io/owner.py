"""Which process owns a temporary folder, so that one killed with SIGKILL is cleaned up later.

Every temporary folder an output is built in carries an owner record (host, PID, and the PID's
start time, so a recycled PID is not mistaken for the owner). A later run removes the
temporary folders of a dead owner on the same host, and nothing else: a folder without a
record, or owned by another host, may belong to a live process it cannot see.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".simmerge-owner.json"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def write_owner(folder: Path) -> None:
    """Record this process as the owner of `folder`."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    (Path(folder) / OWNER_FILE).write_text(json.dumps(record))


def is_owner_record(path: Path) -> bool:
    """Whether `path` holds what write_owner writes: a file of that name holding anything else is
    not simmerge's (a user's file that --overwrite must not delete)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and set(record) == {"host", "pid", "start"}


def owner_is_dead(folder: Path) -> bool:
    """True only when `folder`'s owner was a process of this host that no longer runs."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text())
        host, pid, start = record["host"], int(record["pid"]), record.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no readable record: not provably ours
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return start is not None and _start_time(pid) not in (None, start)


def owned_by_this_process(folder: Path) -> bool:
    """Whether `folder`'s owner record names this very process (host, PID and start time)."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text())
        host, pid, start = record["host"], int(record["pid"]), record.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return host == socket.gethostname() and pid == os.getpid() and start == _start_time(pid)


def clean_stale(parent: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """Remove the folders in `parent` whose names start with one of `prefixes` and whose owner
    died (a run killed mid-write); returns what was removed."""
    removed = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(prefixes)]
    except OSError:
        return removed
    for p in candidates:
        if p.is_dir() and not p.is_symlink() and owner_is_dead(p):
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by a run that was killed", p)
            removed.append(p)
    return removed
