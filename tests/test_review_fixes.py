"""Defects found reviewing the day's change (--intermediate-dir, ...), each with the behaviour
that shows it; real checkpoints and real merges, no stand-ins."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from simmerge_ray.errors import OutputError
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.executor import ExecOptions
from simmerge_ray.merge.intermediate_dir import plan_kept
from simmerge_ray.merge.multi import _merge_stages, load_multi, run_multi
from simmerge_ray.merge.resume import StageKeys, stage_folder
from merge_families import family_fixtures  # beside this file
from test_merge_multi import _two_stage, _write

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")

family, models = family_fixtures(SPEC, "review-fixes-models")


def test_a_run_that_lost_the_race_for_an_intermediate_keeps_the_winners_record(models: Path, tmp_path: Path,
                                                                              caplog) -> None:
    """Two runs share --intermediate-dir. B decides (DIR empty) to merge `tied`; A then merges and
    records it; B's own `tied` then fails (the folder exists). B must not have deleted A's record
    DIR/tied.key.json (a file B did not write): a third run reuses A's `tied` as it is."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep, opts = tmp_path / "inter", ExecOptions(workers=1)
    graph = load_multi(cfg, keeps_intermediates=True).graph
    stages = list(graph.stages)
    keys = StageKeys(stages, graph.root, graph.seed, opts.compute_dtype, opts.allow_nonfinite)
    b = plan_kept(keep, stages, keys, out=tmp_path / "b", overwrite=False)  # B's plan, before A's merge
    assert [s.name for s in b.todo] == ["tied", "the final"]
    run_multi(load_multi(cfg, keeps_intermediates=True), tmp_path / "a", opts, keep)  # A wins
    record = (keep / "tied.key.json").read_bytes()
    folders = {s.name: stage_folder(keep, s.name) for s in stages[:-1]}
    with pytest.raises(OutputError, match="another run published merge 'tied'"):
        _merge_stages(graph, list(b.todo), tmp_path / "b", opts, keys, folders, keep, keep=True, replaced=b.replaced)
    assert (keep / "tied.key.json").read_bytes() == record
    caplog.set_level(logging.WARNING)
    results = run_multi(load_multi(cfg, keeps_intermediates=True), tmp_path / "c", opts, keep)
    assert len(results) == 1 and "reusing merge(s) 'tied'" in caplog.text


def test_a_dangling_link_where_a_record_goes_is_refused_not_replaced(models: Path, tmp_path: Path, capsys,
                                                                     no_ray) -> None:
    """DIR/tied.key.json is a user's link to a file not there (yet): it is not a record simmerge
    wrote, so the run refuses with one line naming it, as for a link to a file, instead of
    renaming its own record over the link."""
    from input_checks import one_line_error
    from simmerge_ray.cli import main

    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = tmp_path / "inter"
    keep.mkdir()
    link = keep / "tied.key.json"
    link.symlink_to(tmp_path / "notes.txt")
    argv = ["merge", str(cfg), "--out", str(tmp_path / "out"), "--intermediate-dir", str(keep), "--workers", "1",
            "--quiet"]
    assert main(argv) == 2
    one_line_error(capsys, f"{link}: not a record simmerge wrote", "--intermediate-dir")
    assert link.is_symlink() and sorted(p.name for p in keep.iterdir()) == ["tied.key.json"]
    assert not (tmp_path / "out").exists()
