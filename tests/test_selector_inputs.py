"""Bad inputs to `simmerge fit`, `evaluate-selector` and `bandit-init` are one line and exit 2,
naming the file and field at fault, with nothing written: each case here once printed a
traceback instead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from simmerge_ray.cli import main as cli_main

OPS = ("linear", "ties")
MODELS = ("m0", "m1", "m2")


def _tables(root: Path) -> tuple[Path, Path]:
    """A tiny feature table and full-information labels over three models and one task."""
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in MODELS for b in MODELS if a != b]
    feats = pl.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs], "task": ["t"] * len(pairs),
                          "s_x": rng.normal(size=len(pairs)), "s_y": rng.normal(size=len(pairs))})
    labs = pl.DataFrame({"task": ["t"] * len(pairs) * len(OPS), "expert": [a for a, _ in pairs for _ in OPS],
                         "aux": [b for _, b in pairs for _ in OPS], "operator": [o for _ in pairs for o in OPS],
                         "utility": rng.uniform(size=len(pairs) * len(OPS))})
    f, l = root / "features.parquet", root / "labels.parquet"
    feats.write_parquet(f)
    labs.write_parquet(l)
    return f, l


def _one_line_error(rc: int, capsys: pytest.CaptureFixture, *needles: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("command", ["fit", "evaluate-selector", "bandit-init"])
def test_a_label_without_a_name_is_refused_by_file_and_column(tmp_path: Path, capsys, command: str) -> None:
    """A null operator (or task, expert, aux) in labels.parquet was a TypeError traceback from sorting names."""
    f, l = _tables(tmp_path)
    labs = pl.read_parquet(l)
    labs.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.col("operator"))
                      .alias("operator")).write_parquet(l)
    out = tmp_path / "out"
    argv = ([command, "--state", str(out), "--features", str(f), "--labels", str(l)] if command == "bandit-init"
            else [command, "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0"])
    _one_line_error(cli_main(argv), capsys, str(l), "'operator'")
    assert not out.exists()


@pytest.mark.parametrize("field", ["mean", "scale"])
def test_a_selector_whose_statistics_do_not_fit_its_schema_is_refused(tmp_path: Path, capsys, field: str) -> None:
    """selector.json with one standardisation entry fewer than features loaded, and bandit-init
    then died in numpy's broadcasting (ValueError traceback)."""
    from simmerge_ray.selector.model import SCHEMA, Selector, SelectorConfig, build_net

    f, l = _tables(tmp_path)
    cfg = SelectorConfig(task_encoding=False, hidden=8)
    sel_dir = Selector(["s_x", "s_y"], list(OPS), [], np.zeros(2), np.ones(2), cfg,
                       build_net(2, len(OPS), cfg)).save(tmp_path / "sel")
    raw = json.loads((sel_dir / SCHEMA).read_text())
    raw[field] = raw[field][:1]
    (sel_dir / SCHEMA).write_text(json.dumps(raw))
    out = tmp_path / "state"
    rc = cli_main(["bandit-init", "--state", str(out), "--features", str(f), "--labels", str(l),
                   "--selector", str(sel_dir)])
    _one_line_error(rc, capsys, str(sel_dir / SCHEMA), field)
    assert not out.exists()


@pytest.mark.parametrize("command", ["fit", "evaluate-selector"])
def test_labels_for_a_pair_the_features_lack_are_refused(tmp_path: Path, capsys, command: str) -> None:
    """Labels of a task the feature table lacks were dropped without a word, the selector fitted
    on the rest (bandit-init refuses the same labels)."""
    f, l = _tables(tmp_path)
    labs = pl.read_parquet(l)
    pl.concat([labs, labs.head(len(OPS)).with_columns(pl.lit("other").alias("task"))]).write_parquet(l)
    out = tmp_path / "out"
    rc = cli_main([command, "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0"])
    _one_line_error(rc, capsys, str(f), "'other'")
    assert not out.exists()
