"""A new user's walk through the README's "Using it on your checkpoints" on the tiny zoo: output
that left the user guessing what went wrong or what a number meant. Each test here failed before
its fix."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from simmerge_ray.cli import main as cli_main


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from benchmarks.synthetic_world import build_world

    return build_world(tmp_path_factory.mktemp("new-user"), n_models=4, epochs=5)


def test_plan_batch_prints_its_error_rows_and_names_its_files_cleanly(world, tmp_path: Path, capsys) -> None:
    """It printed "2 errors" and nothing about them (the messages were only in results.parquet),
    and `--out batch/` gave "wrote batch//results.parquet". A real batch on the tests' cluster."""
    one = world.models[0]
    rows = [{"request_id": "aux", "task": "code", "models": world.models[:2], "aux_weight": 1.0},
            {"request_id": "ok1", "task": "code", "models": world.models[:2]}]
    rows += [{"request_id": f"z{i}", "task": "code", "models": [one]} for i in range(6)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "batch") + "/"
    assert cli_main(["plan-batch", "--requests", str(tmp_path / "r.jsonl"), "--selector", str(world.selector),
                     "--catalog", str(world.catalog), "--features", str(world.features), "--out", out,
                     "--actors", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [ln for ln in lines if ln.startswith("error ")]
    assert len(shown) == 5  # the first five of the 7 error rows, by request_id; the rest counted
    assert shown[0].startswith("error aux: ") and "--aux-selector" in shown[0]
    assert shown[1] == "error z0: " + pl.read_parquet(tmp_path / "batch" / "results.parquet").filter(
        pl.col("request_id") == "z0")["error"][0]
    assert "cannot make a 2-way plan (min_way / --min-way 2" in shown[1]
    assert any(ln.startswith("... and 2 more error rows: see the `error` column of ") for ln in lines)
    assert "//" not in lines[-1] and lines[-1] == f"wrote {tmp_path / 'batch' / 'results.parquet'} and " \
                                                  f"{tmp_path / 'batch' / 'plans'}/"


def test_a_multiway_plan_without_aux_selector_says_its_score_is_the_utility_proxy(world, tmp_path: Path,
                                                                                  capsys) -> None:
    """The README's first multi-way `plan` (a utility selector, no --aux-selector) printed "score =
    1 x predicted share of the expert's gap", then "keeping the expert alone scores 0.500": the
    README says a retention's expert alone scores --retention-weight (1). The steps are scored on
    the two-sided utility, a proxy whose expert-alone value is 0.5; the output now says so."""
    from simmerge_ray.selector.model import Selector

    sel = Selector.load(world.selector)
    sel.meta = {**(sel.meta or {}), "target": "utility"}
    sel.save(tmp_path / "sel")
    argv = ["plan", "--selector", str(tmp_path / "sel"), "--catalog", str(world.catalog), "--features",
            str(world.features), "--task", "code", "--models", *world.models[:3], "--min-way", "3", "--max-way", "3",
            "--retention-weight", "2"]
    assert cli_main([*argv, "--out", str(tmp_path / "plan")]) == 0
    said = capsys.readouterr()
    lines = said.out.splitlines()
    assert "--max-way" not in said.err
    assert ("score = 2 x the expert's predicted retention on code, each step's two-sided utility standing in for "
            "the share of its gap kept (no --aux-selector)") in lines[0]
    (alone,) = [ln for ln in lines if ln.startswith("not merging is predicted")]
    assert ("keeping the expert alone scores 1.000 on this objective (--retention-weight x 0.5: its own two-sided "
            "utility, as the steps are scored), the best plan ") in alone
    # A --max-way above the candidates was capped without a word.
    argv[argv.index("--max-way") + 1] = "9"
    assert cli_main([*argv, "--out", str(tmp_path / "plan9")]) == 0
    assert "simmerge plan: warning: --max-way 9 is more than the 3 candidate models: plans of up to 3" in \
        capsys.readouterr().err.splitlines()


def test_bandit_sim_reports_progress_while_it_replays(tmp_path: Path, capsys, no_ray) -> None:
    """On the tiny zoo's labels `bandit-sim` ran 4.5 minutes with nothing printed until its table;
    it now prints a line per quarter of each replay's repeats."""
    argv = ["bandit-sim", "--synthetic", "--rounds", "5", "--repeats", "8", "--add-at", "2", "--out",
            str(tmp_path / "sim")]
    assert cli_main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bandit-sim: ")]
    said = [ln.split(" (")[0] for ln in lines]
    assert said == [f"bandit-sim: {replay}: {k}/8 repeats" for replay in ("all_operators", "operator_added")
                    for k in (2, 4, 6, 8)]
