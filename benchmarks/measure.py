"""Benchmark helpers: run a command while sampling the memory of its whole process tree."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


class TreeSampler:
    """Peak PSS and RSS of a process and all its descendants (plus, when `group` is given,
    every process of that process group, e.g. a Ray head's daemons), sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.05, group: int | None = None) -> None:
        self.root = psutil.Process(pid)
        self.group = group
        self.period = period
        self.peak_pss = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pss = rss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            if self.group is not None:
                seen = {p.pid for p in procs}
                procs += [p for p in psutil.process_iter() if p.pid not in seen and _pgid(p.pid) == self.group]
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss += info.pss
                    rss += info.rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def timed(cmd: list[str], env: dict[str, str], group: int | None = None) -> dict:
    """Run `cmd`; wall seconds and peak PSS/RSS (GB) of it and all its descendants (and of
    process group `group`, see TreeSampler)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, group=group)
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {"seconds": time.perf_counter() - t0, "peak_pss_gb": sampler.peak_pss / 1e9,
            "peak_rss_gb": sampler.peak_rss / 1e9, "output": out}


@contextmanager
def ray_head(ray_bin: Path, env: dict[str, str], num_cpus: int) -> Iterator[tuple[str, int]]:
    """A `ray start --head` of our own (own ports and temp dir); yields (address, process group).

    `ray start` runs in a new session, so it and every daemon it spawns share the process group
    whose id is its PID: teardown signals that group only, never processes found by name.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: socket path limit
    socks = [socket.socket() for _ in range(5)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    gcs, client, agent, env_agent, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    cmd = [str(ray_bin), "start", "--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           f"--num-cpus={num_cpus}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise SystemExit(f"ray start failed:\n{out}")
        yield f"127.0.0.1:{gcs}", proc.pid
    finally:
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_pgid(p.pid) == proc.pid for p in psutil.process_iter()):
                time.sleep(0.3)
        shutil.rmtree(temp_dir, ignore_errors=True)
