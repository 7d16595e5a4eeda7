"""Merge workers for the fault-injection tests: one that dies once, abruptly, and one that holds
its unit on a chosen node until that node is killed. The library carries no test hook; the tests
hand these subclasses to the executor (`ExecOptions.worker_cls`)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import ray.cloudpickle

from simmerge_ray.merge.unit_merger import UnitMerger
from simmerge_ray.merge.units import WorkUnit

# Ray's workers cannot import this test module: send the class itself, not a reference to it.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def crash_once(marker: Path) -> type[UnitMerger]:
    """A UnitMerger class whose first instance to reach its second unit exits the process (once
    in all: the marker file records it), so a lost worker's retry is exercised mid-merge."""

    class CrashOnceMerger(UnitMerger):
        def run(self, unit: WorkUnit, partial: Mapping[str, Path], allow_nonfinite: bool) -> dict:
            self.units_started = getattr(self, "units_started", 0) + 1
            if self.units_started >= 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().run(unit, partial, allow_nonfinite)

    CrashOnceMerger.__name__ = CrashOnceMerger.__qualname__ = "UnitMerger"  # its actors' titles, as in a real merge
    return CrashOnceMerger


def held_on(node_id: str, marker: Path, hold_s: float = 120.0) -> type[UnitMerger]:
    """A UnitMerger class whose units on node `node_id` wait, after writing `marker`, until that
    node is killed (at most `hold_s`, then they merge as usual), so a test that kills the node
    when the marker appears kills it mid-unit however fast the merge is. Elsewhere (the head, the
    replacement a restarted actor lands on) units merge at once."""

    class HeldMerger(UnitMerger):
        def run(self, unit: WorkUnit, partial: Mapping[str, Path], allow_nonfinite: bool) -> dict:
            if ray.get_runtime_context().get_node_id() == node_id:
                marker.write_text(str(os.getpid()))
                time.sleep(hold_s)
            return super().run(unit, partial, allow_nonfinite)

    HeldMerger.__name__ = HeldMerger.__qualname__ = "UnitMerger"  # its actors' titles, as in a real merge
    return HeldMerger
