"""A new user's walk through the README's "Using it on your checkpoints" on the tiny zoo: output
that left the user guessing what went wrong or what a number meant. Each test here failed before
its fix."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import simmerge_ray.planner.batch as batch
from simmerge_ray.cli import main as cli_main


def _fake_batch(rows: list[tuple[str, str, str | None]]):
    """A run_batch that writes `rows` (request_id, status, error) as its results.parquet."""

    def run_batch(s: batch.BatchSettings) -> batch.BatchReport:
        out = Path(s.out)
        (out / "plans").mkdir(parents=True)
        ids, status, error = (list(c) for c in zip(*rows))
        pq.write_table(pa.table({"request_id": ids, "status": status, "error": error}), out / "results.parquet")
        errors = status.count("error")
        return batch.BatchReport(requests=len(rows), ok=len(rows) - errors, errors=errors, planned=len(rows),
                                 cached=0, invalid=0, executed=0, actors=1, seconds=1.0)

    return run_batch


def _plan_batch(tmp_path: Path, out: str) -> list[str]:
    return ["plan-batch", "--requests", str(tmp_path / "r.jsonl"), "--selector", "sel", "--catalog", "c.yaml",
            "--features", "feats", "--out", out]


def test_plan_batch_prints_its_error_rows_and_names_its_files_cleanly(tmp_path: Path, monkeypatch, capsys) -> None:
    """It printed "2 errors" and nothing about them (the messages were only in results.parquet),
    and `--out batch/` gave "wrote batch//results.parquet"."""
    rows = [("aux", "error", "aux_weight 1 needs the auxiliary selector (--aux-selector)"),
            ("bad", "error", "catalog.yaml: no model named 'nope'"), ("ok1", "ok", None)]
    rows += [(f"z{i}", "error", f"problem {i}") for i in range(6)]
    monkeypatch.setattr(batch, "run_batch", _fake_batch(rows))
    out = str(tmp_path / "batch") + "/"
    assert cli_main(_plan_batch(tmp_path, out)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "error aux: aux_weight 1 needs the auxiliary selector (--aux-selector)" in lines
    assert "error bad: catalog.yaml: no model named 'nope'" in lines
    shown = [ln for ln in lines if ln.startswith("error ")]
    assert len(shown) == 5  # the first five; the rest counted, with where to read them
    assert any(ln.startswith("... and 3 more error rows: see the `error` column of ") for ln in lines)
    assert "//" not in lines[-1] and lines[-1] == f"wrote {tmp_path / 'batch' / 'results.parquet'} and " \
                                                  f"{tmp_path / 'batch' / 'plans'}/"


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from benchmarks.synthetic_world import build_world

    return build_world(tmp_path_factory.mktemp("new-user"), n_models=4, epochs=5)


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
    lines = capsys.readouterr().out.splitlines()
    assert ("score = 2 x the expert's predicted retention on code, each step's two-sided utility standing in for "
            "the share of its gap kept (no --aux-selector)") in lines[0]
    (alone,) = [ln for ln in lines if ln.startswith("not merging is predicted")]
    assert ("keeping the expert alone scores 1.000 on this objective (--retention-weight x 0.5: its own two-sided "
            "utility, as the steps are scored), the best plan ") in alone


def test_label_counts_distinct_merges_as_merges_not_plans(tmp_path: Path, monkeypatch, no_ray) -> None:
    """`label` began with "1555 plans (1259 distinct merges), ..., 1259 to measure" and ended with
    "1259 measured, 0 cached of 1259 plans": the second count is the distinct merges."""
    import simmerge_ray.pipeline.zoo as zoo
    import simmerge_ray.testbed.labels as labels

    for name in ("code", "math"):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "p", "answer": " a"}\n')
    (tmp_path / "base").mkdir()
    (tmp_path / "catalog.yaml").write_text(
        "base: base\nmodels:\n  - {name: code, path: code, task: code}\n  - {name: math, path: math, task: math}\n"
        "tasks:\n  code: {eval: code.jsonl}\n  math: {eval: math.jsonl}\n")
    monkeypatch.setattr(labels, "check_label_models", lambda *a, **k: None)
    monkeypatch.setattr(zoo, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(labels, "run_labels", lambda *a, **k: labels.LabelRunReport(
        total=1259, computed=1000, cached=9, complete=False, seconds=3.0, out=tmp_path / "labels"))
    said: list[str] = []
    zoo.label(tmp_path / "catalog.yaml", tmp_path / "labels", labels.LabelSettings(), echo=said.append)
    assert said[-1] == (f"label: 1000 measured, 9 cached of 1259 distinct merges in 3s (incomplete: rerun to resume) "
                        f"-> {tmp_path / 'labels'}")


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
