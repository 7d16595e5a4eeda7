"""Bad input to `simmerge plan-batch`, `transfer` and `label` that earlier audits left: one line,
exit 2, naming the file or option at fault, before Ray starts, nothing written and the inputs
unchanged. Each case here once went on (Ray started first, a slice that merged the wrong plans,
a source run rebuilt, an option silently capped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from input_checks import cli_status, one_line_error, tree_hash
from test_fit_inputs import ZOO, _selector



def _batch_inputs(root: Path) -> dict[str, Path]:
    """The files plan-batch checks before it plans: a selector, a catalog, a features folder whose
    files are only digested before Ray (their content is read by the planner), and a request table."""
    sel = _selector(root)
    cat = root / "catalog.yaml"
    cat.write_text("models:\n  - {name: m0, path: m0, task: t}\n  - {name: m1, path: m1, task: u}\n")
    (root / "m0").mkdir()
    (root / "m1").mkdir()
    feats = root / "feats"
    feats.mkdir()
    pl.DataFrame({"a": ["m0"], "b": ["m1"], "task": ["t"], "s_x": np.zeros(1)}).write_parquet(feats / "features.parquet")
    (feats / "gram.safetensors").write_bytes(b"")
    (feats / "gram_meta.json").write_text("{}")
    req = root / "requests.jsonl"
    req.write_text('{"request_id": "r1", "task": "t", "models": ["m0", "m1"]}\n')
    return {"selector": sel, "catalog": cat, "features": feats, "requests": req}


def _batch_argv(inputs: dict[str, Path], out: Path, **changed: Path) -> list[str]:
    given = {**inputs, **changed}
    return ["plan-batch", "--requests", str(given["requests"]), "--selector", str(given["selector"]),
            "--catalog", str(given["catalog"]), "--features", str(given["features"]), "--out", str(out)]


@pytest.mark.parametrize("option, value, needle", [
    # ok[:-1]: every ok plan merged but the last, and summary.json said "executed": -1
    ("--execute-top", "-1", "argument --execute-top: -1 is not at least 0"),
    # taken as one worker (max(1, 0)) without a word
    ("--merge-workers", "0", "argument --merge-workers: 0 is not at least 1"),
    ("--merge-workers", "-3", "argument --merge-workers: -3 is not at least 1"),
])
def test_plan_batch_refuses_out_of_range_merge_options(tmp_path: Path, capsys, no_ray, option: str, value: str,
                                                       needle: str) -> None:
    inputs = _batch_inputs(tmp_path)
    before = tree_hash(tmp_path)
    assert cli_status([*_batch_argv(inputs, tmp_path / "out"), option, value]) == 2
    one_line_error(capsys, f"simmerge plan-batch: error: {needle}")
    assert tree_hash(tmp_path) == before


def test_plan_batch_settings_refuse_a_negative_execute_top(tmp_path: Path, no_ray) -> None:
    """The library's own check, for callers that build BatchSettings without the CLI."""
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.planner.batch import BatchSettings, run_batch

    inputs = _batch_inputs(tmp_path)
    with pytest.raises(ConfigError, match=r"execute_top \(-1\) must be >= 0"):
        run_batch(BatchSettings(**{k: str(v) for k, v in inputs.items()}, out=str(tmp_path / "out"), execute_top=-1))


@pytest.mark.parametrize("case", ["csv-table", "empty-table", "out-is-the-requests", "no-selector"])
def test_plan_batch_refuses_bad_input_before_ray_starts(tmp_path: Path, capsys, no_ray, case: str) -> None:
    """The command started (or joined) Ray before it read a single input: every refusal below
    waited for a local cluster first, and on a cluster took a driver's Ray session for a typo."""
    inputs = _batch_inputs(tmp_path)
    out, changed = tmp_path / "out", {}
    if case == "csv-table":
        csv = tmp_path / "requests.csv"
        csv.write_text("request_id,task,models\nr1,t,m0\n")
        changed, needle = {"requests": csv}, f"{csv}: not a readable request table"
    elif case == "empty-table":
        inputs["requests"].write_text("\n")
        needle = f"{inputs['requests']}: the request table has no rows"
    elif case == "out-is-the-requests":
        out, needle = inputs["requests"], "the output is the input"
    else:
        changed = {"selector": tmp_path / "nothing"}
        needle = f"{tmp_path / 'nothing' / 'selector.json'}: selector file not found"
    before = tree_hash(tmp_path)
    assert cli_status(_batch_argv(inputs, out, **changed)) == 2
    one_line_error(capsys, needle)
    assert tree_hash(tmp_path) == before


def test_a_results_cache_in_an_input_is_named_as_the_cache(tmp_path: Path, capsys, no_ray) -> None:
    """--cache inside the features folder: the refusal called the cache "the output"."""
    inputs = _batch_inputs(tmp_path)
    before = tree_hash(tmp_path)
    cache = inputs["features"] / "cache"
    assert cli_status([*_batch_argv(inputs, tmp_path / "out"), "--cache", str(cache)]) == 2
    one_line_error(capsys, f"{cache}: the results cache lies inside the input {inputs['features']}")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("out", ["run", "selector-parent"])
def test_transfer_refuses_the_source_run_folder_as_out(tmp_path: Path, capsys, no_ray, out: str) -> None:
    """--out runs/demo with --selector runs/demo/selector ran the pipeline in the source run: a
    changed zoo config rebuilt its zoo, features and labels; the same one reused them, judging
    the selector on the pairs it was fitted on as a "transfer"."""
    sel = _selector(tmp_path)  # tmp_path/run/selector
    run = sel.parent if out == "run" else tmp_path
    before = tree_hash(tmp_path)
    assert cli_status(["transfer", "--selector", str(sel), "--zoo-config", str(ZOO), "--out", str(run)]) == 2
    one_line_error(capsys, f"{run.resolve()}: the output holds the input {sel}")
    assert tree_hash(tmp_path) == before


def test_label_refuses_more_4_way_orders_than_a_subset_has(tmp_path: Path, capsys, no_ray) -> None:
    """--orders-4 100 was taken as 24 without a word (and recorded as 100 in the label summary)."""
    cat = tmp_path / "catalog.yaml"
    cat.write_text("models:\n  - {name: a, path: a, task: code}\n")
    before = tree_hash(tmp_path)
    assert cli_status(["label", "--catalog", str(cat), "--out", str(tmp_path / "labels"), "--orders-4", "25"]) == 2
    one_line_error(capsys, "--orders-4: Input should be less than or equal to 24")
    assert tree_hash(tmp_path) == before


def test_an_error_row_keeps_a_request_id_of_the_wrong_type_as_written(tmp_path: Path) -> None:
    """A request_id that is not text is an error row, recorded under the id as written: 0 was
    recorded as "" (`raw.get(...) or ""`), and the row could not be found by its id."""
    from simmerge_ray.catalog import Catalog
    from simmerge_ray.planner.batch import prepare_rows

    cat = Catalog.from_dict({"models": [{"name": "m0", "path": "m0", "task": "t"},
                                        {"name": "m1", "path": "m1", "task": "u"}]}, root=tmp_path, check_paths=False)
    rows = prepare_rows([{"request_id": i, "task": "t", "models": ["m0", "m1"]} for i in (0, 7)],
                        "inputs", str(tmp_path / "cache"), cat, {}).to_pylist()
    assert [r["request_id"] for r in rows] == ["0", "7"]
    assert all(r["status"] == "error" and "request_id" in r["error"] for r in rows)
