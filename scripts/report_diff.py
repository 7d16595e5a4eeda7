"""Compare two runs' report.json value by value, ignoring stage timings: the check that a refactor
kept the demo's numbers.

    python scripts/report_diff.py runs/before/report.json runs/after/report.json

Prints one line per differing value (its path, old -> new) and exits 1 when any differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

IGNORED = ("timings",)  # top-level keys that change from run to run by nature


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}/{key}"
            if key not in old or key not in new:
                out.append(f"{where}: only in {'new' if key not in old else 'old'}")
            elif not (path == "" and key in IGNORED):
                out += differences(old[key], new[key], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    old, new = (json.loads(Path(p).read_text()) for p in argv)
    found = differences(old, new)
    print("\n".join(found) if found else f"equal (ignoring {', '.join(IGNORED)})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
