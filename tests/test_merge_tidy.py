"""Work done once that was done twice, and a merge mergekit-multi keeps that simmerge refused:
`merge --plan --ray` checks the plan once before Ray starts (label's eval sets encoded once:
test_testbed); with `--intermediate-dir` a named merge no other document reads is run and kept
in DIR/<name>, as mergekit-multi keeps it (compared with mergekit-multi's output), and without
the option the refusal names it. Real checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

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

def test_a_ray_plan_is_checked_once_before_ray_starts(models: Path, tmp_path: Path, monkeypatch, ray_cluster
                                                     ) -> None:
    """check_plan (headers, configs and tokenizer files of every model) ran before Ray started and
    again inside execute_plan; now once, still before Ray starts. The real functions run (spied
    on), on the tests' Ray cluster."""
    import simmerge_ray.cli.merge as merge_cli
    import simmerge_ray.planner.execute as execute
    from simmerge_ray.cli import main as cli_main

    events: list[str] = []

    def spy(module, name: str) -> None:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: (events.append(name), real(*a, **k))[1])

    spy(execute, "check_plan")
    spy(merge_cli, "init_ray")
    plan, catalog = _plan_files(models, tmp_path)  # ties, slerp, slerp: run as steps, not folded
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(catalog), "--out", str(tmp_path / "merged"),
                     "--ray"]) == 0
    assert events == ["check_plan", "init_ray"]
    assert (tmp_path / "merged" / "config.json").is_file()


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
