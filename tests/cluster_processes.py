"""Process plumbing shared by the tests that start Ray processes of their own (the job-submission
head, the two-node and the autoscaling clusters): free ports, killing by process group and PID,
finding what is left, stopping a driver. Not a test module."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once, so never the same twice)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_group(pgid: int, stragglers: list[psutil.Process]) -> None:
    """SIGKILL a process group, then the given processes (workers that left it), by PID."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in stragglers:
        try:
            p.kill()
        except psutil.Error:
            pass


def digests(folder: Path) -> dict[str, str]:
    """Every file simmerge wrote for a model (not the hidden marker, which names its own run)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.startswith(".")}


def processes_naming(work: Path) -> list[psutil.Process]:
    """Live processes whose command line names the run folder (raylets, GCS, agents, driver)."""
    found = []
    for p in psutil.process_iter():
        try:
            if str(work) in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def stop_driver(proc: subprocess.Popen, work: Path) -> None:
    """Interrupt a driver (it then stops its cluster and writes result.json), then kill its
    process group and every group it recorded in `work/pgids`, by id."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    pgids = [proc.pid]
    if (work / "pgids").exists():
        pgids += [int(line) for line in (work / "pgids").read_text().split()]
    for pgid in pgids:
        kill_group(pgid, [])
    proc.wait(timeout=30)


def reap(work: Path, wait_s: float = 20.0) -> list[psutil.Process]:
    """Wait up to `wait_s` for every process naming `work` to end, remove the folder, and return
    those still alive (a test asserts there are none)."""
    deadline = time.monotonic() + wait_s
    while processes_naming(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_naming(work)
    shutil.rmtree(work, ignore_errors=True)
    return left


def connect(gcs_port: int, head_alive: Callable[[], None], timeout_s: float) -> None:
    """ray.init to a head started moments ago: its GCS accepts drivers a little after `ray start`
    forks it, so retry until `timeout_s`, checking the head is still alive between tries."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False)
            return
        except (ConnectionError, RuntimeError):
            head_alive()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
