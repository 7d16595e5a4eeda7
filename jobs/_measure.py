"""Benchmark helpers: run a command while sampling the memory of its whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


class TreeSampler:
    """Peak PSS and RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.root = psutil.Process(pid)
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


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; wall seconds and peak PSS/RSS (GB) of it and all its descendants."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {"seconds": time.perf_counter() - t0, "peak_pss_gb": sampler.peak_pss / 1e9,
            "peak_rss_gb": sampler.peak_rss / 1e9, "output": out}
