"""Bad or unusual input to `simmerge fit`, `evaluate-selector` and `transfer`: one line, exit 2,
naming the file or option at fault, before Ray starts, with nothing written and the inputs
unchanged. Each case here once ran on (a traceback, a silent fallback, or a fit of nothing)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from input_checks import cli_status


OPS = ("linear", "ties")
MODELS = ("m0", "m1", "m2", "m3")
TASK_OF = {"m0": "t", "m1": "u", "m2": "t", "m3": "u"}
ZOO = Path(__file__).resolve().parents[1] / "configs" / "zoo_tiny.yaml"


def _tables(root: Path, *, ops: tuple[str, ...] = OPS, models: tuple[str, ...] = MODELS,
            utility: float | None = None) -> tuple[Path, Path]:
    """A tiny feature table and full-information labels (one row per pair and arm)."""
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in models for b in models if a != b]
    feats = pl.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs],
                          "task": [TASK_OF[a] for a, _ in pairs],
                          "s_x": rng.normal(size=len(pairs)), "s_y": rng.normal(size=len(pairs))})
    n = len(pairs) * len(ops)
    labs = pl.DataFrame({"task": [TASK_OF[a] for a, _ in pairs for _ in ops],
                         "expert": [a for a, _ in pairs for _ in ops], "aux": [b for _, b in pairs for _ in ops],
                         "aux_task": [TASK_OF[b] for _, b in pairs for _ in ops],
                         "operator": [o for _ in pairs for o in ops],
                         "utility": rng.uniform(size=n) if utility is None else np.full(n, utility)})
    f, l = root / "features.parquet", root / "labels.parquet"
    feats.write_parquet(f)
    labs.write_parquet(l)
    return f, l


def _hashes(*paths: Path) -> dict[str, str]:
    files = [q for p in paths for q in ([p] if p.is_file() else sorted(p.rglob("*"))) if q.is_file()]
    return {str(q): hashlib.blake2b(q.read_bytes()).hexdigest() for q in files}


def _refused(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> None:
    rc = cli_status(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def _selector(root: Path, target: str = "utility") -> Path:
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.train import fit_selector

    f, l = _tables(root)
    sel = fit_selector(load_pair_data(f, l), SelectorConfig(epochs=2))
    sel.meta = {"target": target}
    return sel.save(root / "run" / ("selector" if target == "utility" else "selector_aux"))


@pytest.mark.parametrize("command", ["fit", "evaluate-selector", "transfer"])
@pytest.mark.parametrize("option, value, needle", [
    # numpy's generator: ValueError traceback once the folds were drawn (fit: after Ray Train)
    ("--seed", "-1", "argument --seed: -1 is not a seed from 0 to 4294967295"),
    ("--seed", str(2**64), f"argument --seed: {2**64} is not a seed from 0 to 4294967295"),
    # silently no search at all
    ("--tune-samples", "-3", "argument --tune-samples: -3 is not at least 0"),
])
def test_out_of_range_seed_and_search_are_refused_by_option(tmp_path: Path, capsys, no_ray, command: str,
                                                            option: str, value: str, needle: str) -> None:
    f, l = _tables(tmp_path)
    out = tmp_path / "out"
    argv = (["transfer", "--selector", str(tmp_path), "--zoo-config", str(ZOO), "--out", str(out)]
            if command == "transfer" else [command, "--features", str(f), "--labels", str(l), "--out", str(out)])
    _refused([*argv, option, value], capsys, f"simmerge {command}: error: {needle}")
    assert not out.exists()


@pytest.mark.parametrize("command", ["fit", "evaluate-selector"])
@pytest.mark.parametrize("tables, needle", [
    # a selector of one arm was fitted and judged "ties with the best fixed arm"
    (dict(ops=("linear",)), "column 'operator' holds one arm ('linear'): nothing for the selector to choose between"),
    (dict(utility=0.5), "column 'utility': every arm scores the same on each of the 12 labelled pairs"),
    (dict(utility=0.0), "column 'utility': every arm scores the same on each of the 12 labelled pairs"),
])
def test_labels_without_a_choice_are_refused(tmp_path: Path, capsys, no_ray, command: str, tables: dict,
                                             needle: str) -> None:
    f, l = _tables(tmp_path, **tables)
    before = _hashes(f, l)
    out = tmp_path / "out"
    _refused([command, "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0"],
             capsys, f"{l}: {needle}")
    assert not out.exists() and _hashes(f, l) == before


@pytest.mark.parametrize("command", ["fit", "evaluate-selector"])
@pytest.mark.parametrize("drop", ["row", "null"])
def test_a_pair_labelled_for_some_arms_only_is_refused(tmp_path: Path, capsys, no_ray, command: str,
                                                       drop: str) -> None:
    """The pair was dropped without a word and the selector fitted on the rest."""
    f, l = _tables(tmp_path)
    labs = pl.read_parquet(l)
    hit = (pl.col("expert") == "m1") & (pl.col("aux") == "m2") & (pl.col("operator") == "ties")
    (labs.filter(~hit) if drop == "row" else
     labs.with_columns(pl.when(hit).then(None).otherwise(pl.col("utility")).alias("utility"))).write_parquet(l)
    out = tmp_path / "out"
    _refused([command, "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0"], capsys,
             f"{l}: 1 labelled (task, expert, aux) lack some arm's 'utility', e.g. ('u', 'm1', 'm2') has none "
             f"for 'ties'; label every arm of a pair, or drop the pair")
    assert not out.exists()


def test_a_pair_without_any_value_is_still_dropped_as_the_label_stage_means(tmp_path: Path) -> None:
    """An undefined auxiliary gap nulls every arm of a pair: that pair is left out, not refused."""
    from simmerge_ray.selector.data import load_pair_data

    f, l = _tables(tmp_path)
    labs = pl.read_parquet(l)
    labs.with_columns(pl.when(pl.col("expert") == "m1").then(None).otherwise(pl.col("utility"))
                      .alias("utility")).write_parquet(l)
    assert len(load_pair_data(f, l)) == 9 and "m1" not in load_pair_data(f, l).experts


def test_evaluate_refuses_labels_of_one_model_pair_naming_the_file(tmp_path: Path, capsys, no_ray) -> None:
    """Was "need at least 2 distinct groups (model pairs or tasks) to split, got 1", naming nothing."""
    f, l = _tables(tmp_path, models=("m0", "m1"))
    out = tmp_path / "out"
    _refused(["evaluate-selector", "--features", str(f), "--labels", str(l), "--out", str(out),
              "--tune-samples", "0"], capsys, f"{l}: labels of one model pair (m0, m1): evaluate-selector holds "
                                             f"pairs out, so it needs two or more")
    assert not out.exists()


def test_transfer_refuses_bad_folds_before_building_the_zoo(tmp_path: Path, capsys, no_ray) -> None:
    """--folds 0 reached the in-zoo reference only after the zoo and its labels were built."""
    sel = _selector(tmp_path)
    before = _hashes(sel)
    out = tmp_path / "out"
    for folds in ("0", "1", "-2"):
        _refused(["transfer", "--selector", str(sel), "--zoo-config", str(ZOO), "--out", str(out), "--folds", folds],
                 capsys, f"argument --folds: {folds} is not at least 2")
    assert not out.exists() and _hashes(sel) == before


def test_transfer_refuses_a_selector_of_another_target(tmp_path: Path, capsys, no_ray) -> None:
    """RUN/selector_aux (aux_gap_closed) was judged on the two-sided utility as if it predicted it."""
    sel = _selector(tmp_path, "aux_gap_closed")
    out = tmp_path / "out"
    _refused(["transfer", "--selector", str(sel), "--zoo-config", str(ZOO), "--out", str(out), "--no-reference"],
             capsys, f"{sel}: a selector of target 'aux_gap_closed'; transfer judges the two-sided utility")
    assert not out.exists()


@pytest.mark.parametrize("folder", ["bandit", "features"])
def test_transfer_refuses_a_folder_that_is_no_selector(tmp_path: Path, capsys, no_ray, folder: str) -> None:
    f, _ = _tables(tmp_path)
    given = tmp_path / folder
    given.mkdir()
    shutil.copy(f, given / "features.parquet") if folder == "features" else (given / "state.json").write_text("{}")
    _refused(["transfer", "--selector", str(given), "--zoo-config", str(ZOO), "--out", str(tmp_path / "out")],
             capsys, f"{given}: not a selector folder ({given / 'selector.json'} missing)")
    assert not (tmp_path / "out").exists()


def test_held_out_split_names_the_folds_it_made(tmp_path: Path) -> None:
    """--folds 50 over 6 model pairs makes 6 folds; the report said "50-fold"."""
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import evaluate_pairs, fixed_fit
    from simmerge_ray.selector.model import SelectorConfig

    f, l = _tables(tmp_path)
    data = load_pair_data(f, l)
    report = evaluate_pairs(data, fixed_fit(SelectorConfig(epochs=2)), folds=50)
    assert report["split"] == "6-fold by unordered model pair" and report["n"] == 12
