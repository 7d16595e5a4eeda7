"""scripts/report_diff.py: the refactor check finds every changed value and ignores timings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "report_diff.py"
spec = importlib.util.spec_from_file_location("report_diff", SCRIPT)
report_diff = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_diff)


def test_differences_name_each_changed_value_and_skip_timings(tmp_path: Path, capsys) -> None:
    old = {"timings": {"zoo": 1.0}, "pairwise": {"utility": {"simmerge": {"mean": 0.44}}, "n": [1, 2]},
           "bandit": {"regret": 2.1}}
    new = {"timings": {"zoo": 9.0}, "pairwise": {"utility": {"simmerge": {"mean": 0.45}}, "n": [1, 3]},
           "multiway": {}}
    assert report_diff.differences(old, new) == [
        "/bandit: only in old", "/multiway: only in new", "/pairwise/n[1]: 2 -> 3",
        "/pairwise/utility/simmerge/mean: 0.44 -> 0.45"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(old))
    b.write_text(json.dumps({**old, "timings": {"zoo": 5.0}}))
    assert report_diff.main([str(a), str(b)]) == 0 and "equal (ignoring timings)" in capsys.readouterr().out
    c = tmp_path / "c.json"  # key order and the timings apart, the same report
    c.write_text(json.dumps({"timings": {"zoo": 9.0}, **dict(reversed(list(old.items())))}))
    assert report_diff.main([str(a), str(c)]) == 0
    b.write_text(json.dumps(new))
    assert report_diff.main([str(a), str(b)]) == 1
