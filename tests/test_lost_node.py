"""Issue 21 item 6, a lost node: a real two-node Ray cluster on this machine runs a merge and a
structural pass spread over both nodes; the second node's raylet is killed while both execute
there, a replacement node joins, and both finish with the same bytes and features as an
undisturbed run on the same cluster.

The cluster and its driver live in a process of their own (tests/lost_node_driver.py), so the
session's Ray (conftest's `ray_cluster`) and this process's `ray.init` are never touched. Every
process the driver starts is killed by process group here too, and its folder removed, however
the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from cluster_processes import digests, reap, stop_driver

DRIVER = Path(__file__).with_name("lost_node_driver.py")






def _tails(work: Path) -> str:
    """The end of each node's log and what the driver recorded: the story of a failed run."""
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(work.glob("*.log"))]
    if (work / "result.json").exists():
        parts.append(f"--- result.json\n{(work / 'result.json').read_text()}")
    return "\n".join(parts)




def test_merge_and_structural_pass_survive_a_lost_node() -> None:
    work = Path(tempfile.mkdtemp(prefix="ln-", dir="/tmp"))  # short: Ray's socket paths are limited
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(DRIVER), str(work)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            stop_driver(proc, work)
            out = proc.stdout.read() if proc.stdout else ""
        assert proc.returncode == 0, f"driver exit {proc.returncode}:\n{out[-3000:]}\n{_tails(work)}"
        result = json.loads((work / "result.json").read_text())
        print(f"two-node lost-node test: {time.monotonic() - t0:.1f} s; driver timings {result['timings']}; "
              f"calls resubmitted by the pool {result.get('resubmitted_calls')}")
        assert result["ref_errors"] == {} and result["lost_errors"] == {}, result

        def actors(seen: dict[str, list[str]], node: str) -> set[str]:
            return {t.split(".")[0] for t in seen.get(node, []) if t.startswith(("ray::UnitMerger", "ray::GramWorker"))}

        # Each pool had one actor on each node (one slot of each kind per node), in both runs.
        for seen in (result["ref_seen"], result["lost_seen"]):
            assert actors(seen, "head") == actors(seen, "node2") == {"ray::UnitMerger", "ray::GramWorker"}
        # The kill landed while node 2 merged a unit; the unit it held was merged again by its actor,
        # restarted on the replacement node, and the structural pass's actors (its lost one and
        # the third, which waited for room) ran there too.
        assert result["killed_mid_run"] is True
        assert "node3" in result["lost_merge_nodes"] and "head" in result["lost_merge_nodes"], result["lost_merge_nodes"]
        assert "ray::GramWorker" in actors(result["lost_seen"], "node3")
        assert result["alive_nodes_after"] == 2  # the head and the replacement

        ref, lost = digests(work / "ref-merged"), digests(work / "lost-merged")
        assert sum(name.endswith(".safetensors") for name in ref) >= 4 and lost == ref

        for table in ("structural.parquet", "structural_layers.parquet"):
            a, b = pl.read_parquet(work / "ref-features" / table), pl.read_parquet(work / "lost-features" / table)
            assert a.height > 0 and a.equals(b), table
        feats = pl.read_parquet(work / "lost-features" / "structural.parquet")
        assert feats.height == 6  # the 3 x 2 ordered pairs of the catalog's models
        assert np.isfinite(feats.select(pl.col("^s_.*$").cast(pl.Float64)).to_numpy()).mean() > 0.5
        assert (work / "ref-features" / "gram.safetensors").read_bytes() == \
            (work / "lost-features" / "gram.safetensors").read_bytes()
    finally:
        stop_driver(proc, work)
        left = reap(work)
    assert left == [], f"processes left behind: {[p.pid for p in left]}"
