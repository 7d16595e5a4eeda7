"""Bad inputs to `simmerge plan` and `plan-batch` as a new user gives them (a hand-edited selector
folder, a damaged feature table, a selector fitted on fewer arms, a binary calibration file) are
one line, exit 2, naming the file and field, with the inputs unchanged and nothing written: each
case here once printed a traceback or planned from a misread input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from benchmarks.synthetic_world import build_world, synthetic_labels
from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError
from simmerge_ray.planner.batch import BatchSettings, run_batch
from input_checks import as_aux_selector, cli_status, one_line_error, tree_hash  # beside this file


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    return build_world(tmp_path_factory.mktemp("plan-inputs"), n_models=4)



def _plan(world, tmp_path: Path, capsys, *extra: str, selector: Path | None = None, features: Path | None = None,
          mode: tuple[str, ...] = ("--expert", "code-0", "--aux", "math-0")) -> str:
    """Run `simmerge plan`; assert exit 2, one line, no output folder, inputs unchanged; the line."""
    sel, feats = selector or world.selector, features or world.features
    before = {p: tree_hash(p) for p in (sel, feats)}
    rc = cli_main(["plan", "--selector", str(sel), "--catalog", str(world.catalog), "--features", str(feats),
                   "--task", "code", *mode, *extra, "--out", str(tmp_path / "plan")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not (tmp_path / "plan").exists()
    assert {p: tree_hash(p) for p in (sel, feats)} == before
    return err[0]


def _edit(field: str, value: Any) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        target, key = (raw["config"], field.split(".")[1]) if field.startswith("config.") else (raw, field)
        target[key] = value(target[key]) if callable(value) else value
    return edit


@pytest.mark.parametrize("field, value, needle", [
    ("feature_names", lambda v: [5, *v[1:]], "feature_names[0] is 5, not a name"),  # TypeError traceback
    ("feature_names", lambda v: [v[0], *v], "feature_names: 'f_act_cos_mean' is listed twice"),  # polars traceback
    ("tasks", "code", "tasks is str, not a list of names"),  # read as tasks c, o, d, e: planned, exit 0
    ("operators", lambda v: [v[0], *v[:-1]], "operators: 'linear' is listed twice"),  # planned, exit 0
    ("meta", [], "meta is [], not an object whose target is a name"),  # AttributeError traceback
    ("config.task_encoding", "no", "selector config: task_encoding is 'no', not bool"),  # read as true
    ("config.hidden", "16", "selector config: hidden is '16', not int"),  # was torch's message about `size`
])
def test_a_hand_edited_selector_schema_names_the_field(world, tmp_path: Path, capsys, field: str, value,
                                                       needle: str) -> None:
    sel = tmp_path / "sel"
    shutil.copytree(world.selector, sel)
    raw = json.loads((sel / "selector.json").read_text())
    _edit(field, value)(raw)
    (sel / "selector.json").write_text(json.dumps(raw))
    line = _plan(world, tmp_path, capsys, selector=sel)
    assert line == f"simmerge plan: error: {sel / 'selector.json'}: not a selector's schema or weights (ConfigError: {needle})"


def test_a_pairwise_plan_refuses_a_selector_with_an_arm_this_version_lacks(world, tmp_path: Path, capsys) -> None:
    """An arm renamed or dropped since the selector was fitted was listed in the plan's arm table,
    and failed only when it was the one chosen (a KeyError deep in writing merge.yaml)."""
    sel = tmp_path / "sel"
    shutil.copytree(world.selector, sel)
    raw = json.loads((sel / "selector.json").read_text())
    known = list(raw["operators"])
    raw["operators"][-1] = "ties_v0"
    (sel / "selector.json").write_text(json.dumps(raw))
    line = _plan(world, tmp_path, capsys, selector=sel)
    assert line.startswith(f"simmerge plan: error: {sel}: the selector predicts arms this version does not know: "
                           f"ties_v0 (known: "), line
    assert all(a in line for a in known[:-1])


def test_a_multiway_plan_refuses_a_selector_without_every_step_arm(world, tmp_path: Path, capsys) -> None:
    """A selector fitted on labels without slerp planned pairs, and died in the search of a
    multi-way plan (`ValueError: tuple.index(x): x not in tuple`); plan-batch the same in each actor."""
    from simmerge_ray.selector.data import build_pair_data
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.train import fit_selector

    feats = pl.read_parquet(world.features / "features.parquet")
    labels = synthetic_labels(feats, Catalog.load(world.catalog), np.random.default_rng(0))
    fit_selector(build_pair_data(labels.filter(pl.col("operator") != "slerp"), feats),
                 SelectorConfig(hidden=8, depth=1, epochs=2)).save(tmp_path / "sel")
    needle = (f"{tmp_path / 'sel'}: the selector predicts the arms linear, ties; multi-way plans need slerp too "
              f"(fit it on labels of every step arm: linear, slerp, ties)")
    line = _plan(world, tmp_path, capsys, selector=tmp_path / "sel", mode=("--models", "code-0", "math-0", "rag-0"))
    assert line == f"simmerge plan: error: {needle}"
    (tmp_path / "req.jsonl").write_text(json.dumps({"request_id": "a", "task": "code", "models": ["code-0", "math-0"]}))
    with pytest.raises(ConfigError) as e:
        run_batch(BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(tmp_path / "sel"),
                                catalog=str(world.catalog), features=str(world.features), out=str(tmp_path / "out"),
                                actors=1))
    assert str(e.value) == needle
    assert not (tmp_path / "out").exists()


def _null_first(col: str) -> Callable[[pl.DataFrame], pl.DataFrame]:
    return lambda d: d.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col(col)).alias(col))


@pytest.mark.parametrize("multiway", [False, True])
@pytest.mark.parametrize("damage, needle", [
    (lambda d: d.drop("task"), "no column 'task' (a feature table has one row per a, b, task)"),  # "keys appear twice"
    (_null_first("task"), "column 'task' is null in 1 row(s); every row names its a, b and task"),  # TypeError
    (lambda d: d.with_columns(pl.col("a").rank("dense").cast(pl.Int64)), "column 'a' holds Int64, not names"),
    (lambda d: d.with_columns(pl.col("f_kl_ab_mean").cast(pl.String)),  # traceback (pairwise); cast silently
     "column 'f_kl_ab_mean' holds String, not numbers"),
])
def test_a_feature_table_of_bad_keys_or_text_features_names_the_column(world, tmp_path: Path, capsys, damage,
                                                                       needle: str, multiway: bool) -> None:
    feats = tmp_path / "feats"
    shutil.copytree(world.features, feats)
    damage(pl.read_parquet(feats / "features.parquet")).write_parquet(feats / "features.parquet")
    mode = ("--models", "code-0", "math-0", "rag-0") if multiway else ("--expert", "code-0", "--aux", "math-0")
    line = _plan(world, tmp_path, capsys, features=feats, mode=mode)
    assert line == f"simmerge plan: error: {feats / 'features.parquet'}: {needle}"


def test_selectors_in_each_others_roles_are_refused(world, tmp_path: Path, capsys) -> None:
    """A selector fitted on the auxiliaries' side given as --selector, or one fitted on utility as
    --aux-selector (the same folder for both, or the two swapped), planned without a word."""
    aux = as_aux_selector(world.selector, tmp_path / "aux")
    multi = ("--models", "code-0", "math-0", "rag-0")
    line = _plan(world, tmp_path, capsys, "--aux-selector", str(world.selector), selector=aux, mode=multi)
    assert line == (f"simmerge plan: error: {aux}: --selector was fitted with --target aux_gap_closed (the auxiliaries' "
                    f"side, what --aux-selector takes); give a selector fitted on utility or gap_closed")
    line = _plan(world, tmp_path, capsys, "--aux-selector", str(world.selector), mode=multi)
    assert line == (f"simmerge plan: error: {world.selector}: --aux-selector was fitted with --target utility, not "
                    f"aux_gap_closed (fit it with `simmerge fit --target aux_gap_closed`)")
    assert cli_main(["plan", "--selector", str(world.selector), "--aux-selector", str(aux), "--catalog",
                     str(world.catalog), "--features", str(world.features), "--task", "code", *multi,
                     "--aux-weight", "0.5", "--out", str(tmp_path / "ok")]) == 0


def test_a_binary_calibration_file_is_one_line(world, tmp_path: Path, capsys) -> None:
    """Was a UnicodeDecodeError traceback."""
    cal = tmp_path / "calibration.json"
    cal.write_bytes(b"\xff\xfe\x00\x01")
    line = _plan(world, tmp_path, capsys, "--aux-selector", str(world.selector), "--calibration", str(cal),
                 mode=("--models", "code-0", "math-0", "rag-0"))
    assert line == (f"simmerge plan: error: --calibration {cal}: unreadable (UnicodeDecodeError: 'utf-8' codec can't "
                    f"decode byte 0xff in position 0: invalid start byte)")
    assert cal.read_bytes() == b"\xff\xfe\x00\x01"


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["sizes"]["3"].update(subsets=-2), "sizes.3.subsets is -2, not an integer >= 1"),
    (lambda d: d["sizes"]["3"]["pick"].update(targets=1.5), "sizes.3.pick.targets is 1.5, not an integer >= 1"),
    (lambda d: d["sizes"].update({"1": d["sizes"]["3"]}), "sizes: '1' is not a plan size (an integer >= 2)"),
    (lambda d: d["sizes"]["3"]["halfwidth"].update(abc=[0.1, 0.1]),
     "sizes.3: coverage level 'abc' is not a percentage in (0, 100)"),
    (lambda d: d["objective"].update(aux_weight="nan"), "objective.aux_weight is 'nan', not a finite number"),
    (lambda d: d["objective"].update(expert_weight=1.0),
     "objective: unknown weight 'expert_weight' (known: retention_weight, aux_weight)"),
])
def test_a_hand_edited_calibration_names_the_field(edit, needle: str) -> None:
    """These were read as something else: 1.5 picks as 1, a weight "nan" as NaN, a size "1" as a
    plan size; negative counts and unknown weights passed."""
    from simmerge_ray.planner.calibrate import FEATURES, MultiwayCalibration, RetentionCalibrator

    pick = {"targets": 24, "bias": [-0.05, 0.02], "halfwidth": {"80": [0.2, 0.05]}}
    cal = MultiwayCalibration({3: RetentionCalibrator(np.zeros((len(FEATURES), 2)))}, {3: 8},
                              {3: {"80": [0.05, 0.1]}}, {3: pick}, {"retention_weight": 1.0, "aux_weight": 1.0})
    assert MultiwayCalibration.from_json(cal.to_json()).subsets == {3: 8}
    raw = json.loads(cal.to_json())
    edit(raw)
    with pytest.raises(ConfigError) as err:
        MultiwayCalibration.from_json(json.dumps(raw), "calibration.json")
    assert str(err.value) == f"calibration.json: not a multi-way calibration file ({needle})"


def test_a_request_table_of_another_format_says_which_are_read(tmp_path: Path) -> None:
    """A .csv was read as parquet: "magic bytes not found", without a word on what is read."""
    from simmerge_ray.planner.request_table import read_requests

    csv = tmp_path / "requests.csv"
    csv.write_text("request_id,task\nr1,code\n")
    with pytest.raises(ConfigError, match=r"requests\.csv: not a readable request table \(.*\); request tables are "
                                          r"\.parquet, \.jsonl or \.json$"):
        read_requests(str(csv))


def test_the_feature_table_stands_for_its_folder(world, tmp_path: Path, capsys) -> None:
    """`--features DIR/features.parquet`, as `fit` and `bandit-init` take it, plans as `--features
    DIR` does (it was read as a folder: "Not a directory" on gram_meta.json inside the file);
    another file of the folder is one line naming it."""
    argv = ["plan", "--selector", str(world.selector), "--catalog", str(world.catalog), "--task", "code",
            "--expert", "code-0", "--aux", "math-0"]
    for name, features in (("by-folder", world.features), ("by-table", world.features / "features.parquet")):
        assert cli_main([*argv, "--features", str(features), "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    by_folder, by_table = (json.loads((tmp_path / n / "plan.json").read_text()) for n in ("by-folder", "by-table"))
    assert by_table == by_folder
    gram = world.features / "gram.safetensors"
    assert cli_status([*argv, "--features", str(gram), "--out", str(tmp_path / "gram")]) == 2
    one_line_error(capsys, f"argument --features: {gram} is a file; give the features folder (`simmerge features` "
                           "writes features.parquet and the Gram files there)")
    assert not (tmp_path / "gram").exists()
    assert cli_status(["plan-batch", "--requests", "r.parquet", "--selector", str(world.selector), "--catalog",
                       str(world.catalog), "--features", str(gram), "--out", str(tmp_path / "batch")]) == 2
    one_line_error(capsys, f"simmerge plan-batch: error: argument --features: {gram} is a file; give the features folder")
    assert not (tmp_path / "batch").exists()
