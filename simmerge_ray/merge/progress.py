"""A one-line progress bar for merges: share done, bytes, tensors, rate and ETA.

Drawn on stderr at most ten times a second, only when stderr is a terminal and the command was
not asked to be quiet, so logs and pipes get nothing but the final summary. Updates may come
from several worker threads at once.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from simmerge_ray.sizes import human_bytes, human_rate


class Progress:
    """Counts merged elements and finished tensors; `bytes_in` scales elements to input bytes."""

    def __init__(self, total_elements: int, total_tensors: int, bytes_in: int, *, enabled: bool,
                 stream: TextIO | None = None, label: str = "merging") -> None:
        self.total = max(1, total_elements)
        self.tensors_total = total_tensors
        self.bytes_in = bytes_in
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.label = label
        self.done = 0
        self.tensors = 0
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._drawn = 0.0

    @classmethod
    def for_terminal(cls, total_elements: int, total_tensors: int, bytes_in: int, *, quiet: bool) -> "Progress":
        return cls(total_elements, total_tensors, bytes_in, enabled=not quiet and sys.stderr.isatty())

    def advance(self, elements: int, tensors: int = 0) -> None:
        with self._lock:
            self.done += elements
            self.tensors += tensors
            now = time.perf_counter()
            if self.enabled and now - self._drawn >= 0.1:
                self._drawn = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The bar's text (also what tests read)."""
        elapsed = (now or time.perf_counter()) - self._t0
        share = min(1.0, self.done / self.total)
        read = share * self.bytes_in
        eta = f"{(self.bytes_in - read) * elapsed / read:.0f} s" if read > 0 and share < 1 else "-"
        bar = "#" * int(share * 24)
        return (f"{self.label} [{bar:<24}] {share:4.0%} {human_bytes(read)} / {human_bytes(self.bytes_in)}  "
                f"{self.tensors}/{self.tensors_total} tensors  {human_rate(read, elapsed)}  ETA {eta}")

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Clear the bar's line (the command prints its own summary)."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
