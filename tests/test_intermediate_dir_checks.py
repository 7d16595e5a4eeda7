"""`merge --intermediate-dir DIR` checked where the merges run (the library), not only by the
command: DIR may not be, hold or lie inside a model folder the config reads, for a caller of
run_multi as for `simmerge merge`; and a run that loses the race for DIR/<name> to another run
sharing DIR says so, instead of advising --overwrite. Real checkpoints, real merges."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.estimate import estimate_stages
from simmerge_ray.merge.executor import ExecOptions
from simmerge_ray.merge.intermediate_dir import plan_kept
from simmerge_ray.merge.multi import _merge_stages, load_multi, run_multi
from simmerge_ray.merge.resume import StageKeys, stage_folder
from input_checks import one_line_error, tree_hash  # beside this file
from merge_families import family_fixtures  # beside this file
from test_merge_multi import _merge, _two_stage, _write

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")

family, models = family_fixtures(SPEC, "intermediate-dir-checks-models")

OPTS = ExecOptions(workers=1)


def _places(models: Path, tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """A bad DIR for each way it can overlap an input, the config file, and words of the refusal."""
    cfg = tmp_path / "multi.yaml"
    return {"inside": (models / "m1" / "inter", cfg, f"lies inside the input {models / 'm1'}"),
            "holds": (models, cfg, f"holds the input {models}"),
            "config": (tmp_path / "configs", tmp_path / "configs" / "multi.yaml",
                       f"holds the input {tmp_path / 'configs' / 'multi.yaml'}")}


@pytest.mark.parametrize("where", ["inside", "holds", "config"])
def test_run_multi_refuses_an_intermediate_dir_overlapping_an_input(models: Path, tmp_path: Path, where: str
                                                                    ) -> None:
    """run_multi(..., keep_in=DIR), with no command around it: DIR inside m1, DIR holding the
    models, DIR holding the config file are refused before anything is written; the models and
    DIR are as they were, no --out. The dry run's estimate refuses it the same way."""
    keep, cfg, words = _places(models, tmp_path)[where]
    cfg.parent.mkdir(exist_ok=True)
    cfg = _write(cfg, _two_stage(models))
    before = tree_hash(models)
    multi = load_multi(cfg, keeps_intermediates=True)
    with pytest.raises(ConfigError, match="--intermediate-dir") as e:
        run_multi(multi, tmp_path / "out", OPTS, keep)
    assert words in str(e.value) and "the folder" in str(e.value)
    with pytest.raises(ConfigError, match="--intermediate-dir"):
        estimate_stages(multi.graph, OPTS, multi.specs, tmp_path / "out", keep)
    assert tree_hash(models) == before and not (tmp_path / "out").exists()
    assert not (models / "m1" / "inter").exists()


def test_the_command_refuses_it_once_and_before_ray(models: Path, tmp_path: Path, capsys, no_ray) -> None:
    """`simmerge merge CONFIG --intermediate-dir m1/inter` (locally, with --ray, and as a dry run):
    one line naming the input, Ray never started, nothing written."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = models / "m1" / "inter"
    before = tree_hash(models)
    for extra in ([], ["--ray"], ["--dry-run"]):
        assert _merge(cfg, "--out", tmp_path / "out", "--intermediate-dir", keep, *extra) == 2
        one_line_error(capsys, "simmerge merge: error: --intermediate-dir", f"lies inside the input {models / 'm1'}")
    assert tree_hash(models) == before and not (tmp_path / "out").exists() and not keep.exists()


def test_the_run_that_lost_the_race_for_dir_name_says_so(models: Path, tmp_path: Path, caplog) -> None:
    """Runs B and A share DIR. B plans (DIR/tied absent: B will merge it); A runs and publishes
    DIR/tied; B's merge of `tied` then fails. B says that another run published merge 'tied' in
    DIR meanwhile and that rerunning reuses it, not "pass --overwrite" (which would replace A's
    valid merge); rerun, B's command reuses A's `tied` untouched."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = tmp_path / "inter"
    graph = load_multi(cfg, keeps_intermediates=True).graph
    stages = list(graph.stages)
    keys = StageKeys(stages, graph.root, graph.seed, OPTS.compute_dtype, OPTS.allow_nonfinite)
    b = plan_kept(keep, stages, keys, out=tmp_path / "b", overwrite=False)
    assert [s.name for s in b.todo] == ["tied", "the final"] and not b.replaced
    run_multi(load_multi(cfg, keeps_intermediates=True), tmp_path / "a", OPTS, keep)  # A wins the race
    published = tree_hash(keep)
    folders = {s.name: stage_folder(keep, s.name) for s in stages[:-1]}
    with pytest.raises(OutputError) as e:
        _merge_stages(graph, list(b.todo), tmp_path / "b", OPTS, keys, folders, keep, keep=True, replaced=b.replaced)
    message = str(e.value)
    assert f"another run published merge 'tied' in {keep} meanwhile" in message, message
    assert "rerun the same command" in message and "--overwrite" not in message, message
    assert tree_hash(keep) == published and not (tmp_path / "b").exists()
    caplog.set_level(logging.WARNING)
    assert len(run_multi(load_multi(cfg, keeps_intermediates=True), tmp_path / "b", OPTS, keep)) == 1
    assert "reusing merge(s) 'tied'" in caplog.text and tree_hash(keep) == published
