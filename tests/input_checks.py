"""Checks shared by the tests of bad input (beside them; the tests folder is on sys.path): the
one-line error a command must print, a hash of a folder's files to show inputs unchanged, and
the exit status of a command whose usage error argparse raises as SystemExit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) -> blake2b of its bytes."""
    return {str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """stderr so far: exactly one line, no traceback, holding every needle."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def as_aux_selector(selector: Path, dst: Path) -> Path:
    """A copy of `selector` recorded as fitted on the auxiliaries' side (meta target
    aux_gap_closed): a synthetic world's one selector standing in for its --aux-selector."""
    import json
    import shutil

    shutil.copytree(selector, dst)
    raw = json.loads((dst / "selector.json").read_text())
    raw["meta"] = {**raw.get("meta", {}), "target": "aux_gap_closed"}
    (dst / "selector.json").write_text(json.dumps(raw))
    return dst


def cli_status(argv: list[str]) -> int:
    """`simmerge argv`'s exit status, argparse's usage errors (SystemExit) included."""
    from simmerge_ray.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)
