"""Work done once that was done twice, and a merge mergekit-multi keeps that simmerge refused:
`merge --plan --ray` checks the plan once before Ray starts; `label` encodes the eval sets once,
its pre-Ray check's set reused by the run; with `--intermediate-dir` a named merge no other
document reads is run and kept in DIR/<name>, as mergekit-multi keeps it (compared with
mergekit-multi's output), and without the option the refusal names it. Real checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from simmerge_ray.io.synthetic import SyntheticSpec
from merge_families import family_fixtures  # beside this file
from input_checks import one_line_error, tree_hash
from mergekit_oracle import load_all, run_mergekit_multi
from test_merge_multi import _leftovers, _merge, _two_stage, _weights, _write
from test_plan_resume import _files as _plan_files

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")
F32 = {"dtype": "float32", "out_dtype": "float32"}

family, models = family_fixtures(SPEC, "tidy-models")


# ---- merge --plan --ray: the plan is checked once ------------------------------------------------

def test_a_ray_plan_is_checked_once_before_ray_starts(models: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """check_plan (headers, configs and tokenizer files of every model) ran before Ray started and
    again inside execute_plan; now once, still before Ray starts."""
    import simmerge_ray.cli.merge as merge_cli
    import simmerge_ray.planner.execute as execute
    from simmerge_ray.cli import main as cli_main

    events: list[str] = []
    real = execute.check_plan
    monkeypatch.setattr(execute, "check_plan", lambda *a, **k: (events.append("check_plan"), real(*a, **k))[1])
    monkeypatch.setattr(merge_cli, "init_ray", lambda *a, **k: events.append("init_ray"))
    monkeypatch.setattr(execute, "run_stages", lambda *a, **k: (events.append("run"), [SimpleNamespace(
        seconds=0.0, bytes_read=0, bytes_written=0)])[1])
    plan, catalog = _plan_files(models, tmp_path)  # ties, slerp, slerp: run as steps, not folded
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(catalog), "--out", str(tmp_path / "merged"),
                     "--ray"]) == 0
    assert events == ["check_plan", "init_ray", "run"]


# ---- label: the eval sets are encoded once on the driver -------------------------------------------

def test_label_encodes_the_eval_sets_once(models: Path, tmp_path: Path, monkeypatch) -> None:
    """check_label_models encodes every eval set before Ray starts (an example the base's
    tokenizer cannot split is named there); run_labels encoded them all again for their digests.
    Now the run reuses the check's. (The actors encode their own: they are given the catalog.)"""
    import simmerge_ray.pipeline.zoo as zoo
    import simmerge_ray.testbed.labels as labels
    from simmerge_ray.testbed.evaluate import EncodedEvalSet

    for task in ("code", "math"):
        (tmp_path / f"{task}.jsonl").write_text('{"prompt": "p", "answer": " a"}\n')
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({
        "base": str(models / "base"),
        "models": [{"name": "code", "path": str(models / "m1"), "task": "code"},
                   {"name": "math", "path": str(models / "m2"), "task": "math"}],
        "tasks": {"code": {"eval": str(tmp_path / "code.jsonl")}, "math": {"eval": str(tmp_path / "math.jsonl")}}}))
    calls = []

    def encoded(cat):
        calls.append(cat)
        ones = torch.ones(1, 4, dtype=torch.long)
        return {t: EncodedEvalSet(ones * i, ones, ones.bool()) for i, t in enumerate(("code", "math"))}

    monkeypatch.setattr(labels, "encoded_evals", encoded)
    monkeypatch.setattr(zoo, "init_ray", lambda *a, **k: None)
    rep = zoo.label(tmp_path / "catalog.yaml", tmp_path / "labels", labels.LabelSettings(), max_plans=0,
                    echo=lambda *_: None)
    assert rep.computed == 0 and rep.total > 0
    assert len(calls) == 1


# ---- --intermediate-dir keeps a merge no other document reads -------------------------------------

def _with_unread(m: Path) -> list[dict]:
    """_two_stage plus `extra` (a linear merge of m2 and m4), which no other document reads."""
    extra = {"name": "extra", "merge_method": "linear",
             "models": [{"model": str(m / "m2"), "parameters": {"weight": 0.3}},
                        {"model": str(m / "m4"), "parameters": {"weight": 0.7}}], **F32}
    first, final = _two_stage(m)
    return [first, extra, final]


def test_an_unread_named_merge_is_kept_in_the_intermediate_dir_as_mergekit_multi_keeps_it(
        models: Path, tmp_path: Path, capsys, caplog) -> None:
    """DIR/extra and DIR/tied hold mergekit-multi's merges of those names and the final its final
    (to the oracle tolerance); the final equals a run of the file without `extra`. Run again,
    both are reused."""
    caplog.set_level(logging.WARNING)
    cfg = _write(tmp_path / "multi.yaml", _with_unread(models))
    keep = tmp_path / "inter"
    assert _merge(cfg, "--out", tmp_path / "ours", "--intermediate-dir", keep) == 0
    assert sorted(p.name for p in keep.iterdir()) == ["extra", "extra.key.json", "tied", "tied.key.json"]
    assert _leftovers(tmp_path) == []
    run_mergekit_multi(cfg, tmp_path / "theirs", tmp_path / "mk-inter")
    pairs = [(keep / n, tmp_path / "mk-inter" / n) for n in ("extra", "tied")] + [(tmp_path / "ours", tmp_path / "theirs")]
    for ours, theirs in pairs:
        a, b = load_all(ours), load_all(theirs)
        assert set(a) == set(b) and a
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)
    plain = _write(tmp_path / "plain.yaml", _two_stage(models))
    assert _merge(plain, "--out", tmp_path / "plain") == 0
    assert _weights(tmp_path / "ours") == _weights(tmp_path / "plain")
    capsys.readouterr()
    kept = tree_hash(keep)
    caplog.clear()
    assert _merge(cfg, "--out", tmp_path / "again", "--intermediate-dir", keep) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out
    assert f"reusing merge(s) 'extra', 'tied' kept in {keep}" in caplog.text
    assert tree_hash(keep) == kept


def test_an_unread_named_merge_without_intermediate_dir_is_refused_naming_the_option(
        models: Path, tmp_path: Path, capsys, no_ray) -> None:
    """Without --intermediate-dir its output would be thrown away: refused in one line that says
    how to keep it; nothing written."""
    cfg = _write(tmp_path / "multi.yaml", _with_unread(models))
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert _merge(cfg, "--out", tmp_path / "merged") == 2
    one_line_error(capsys, "document 2 ('extra')", "no other merge reads it", "--intermediate-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
