"""Where a multi-document config's intermediates live, and what the output says of them: the
final's recorded config, card and simmerge_merge.json name an intermediate by its document name,
never by the deleted work folder; `--intermediate-dir DIR` writes the named merges to DIR/<name>
and keeps them (mergekit-multi's option), reusing only what simmerge wrote there for the same
key and refusing any other folder of that name; the dry run counts only the merges a run would
not resume from. Real checkpoints, real merges."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.synthetic import SyntheticSpec
from merge_families import family_fixtures  # beside this file
from input_checks import one_line_error, tree_hash  # beside this file
from mergekit_oracle import load_all, run_mergekit_multi
from test_merge_multi import _interrupted, _leftovers, _merge, _two_stage, _weights, _write
from test_merge_multi_tokenizers import F32 as VOCAB_F32, _first, _swap_words, zoo  # noqa: F401 (a fixture)
from test_plan_resume import _corrupt, _files as _plan_files

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")


family, models = family_fixtures(SPEC, "multi-dirs-models")


def _final_doc(cfg: Path) -> dict:
    return [d for d in yaml.safe_load_all(cfg.read_text()) if "name" not in d][0]


def _names_no_work_folder(out: Path) -> None:
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.suffix != ".safetensors":
            assert b".plan-" not in f.read_bytes(), f


# ---- 1. the output names an intermediate as the config does -------------------------------------

def test_the_final_output_names_an_intermediate_by_its_document_name(models: Path, tmp_path: Path) -> None:
    """mergekit_config.yml is the final document as written (`tied` where a model goes), not with
    the work folder's path substituted (deleted after the run); no file of the output names that
    folder; simmerge_merge.json has no path for the intermediate, which is gone."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    out = tmp_path / "merged"
    assert _merge(cfg, "--out", out) == 0
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == _final_doc(cfg)
    _names_no_work_folder(out)
    info = json.loads((out / "simmerge_merge.json").read_text())
    assert info["models"] == ["tied", str(models / "m3")] and info["model_paths"]["tied"] is None
    assert info["plan"]["steps"] == {"tied": f"merge 'tied' of {cfg}"}
    card = (out / "README.md").read_text()
    assert f"* `merge 'tied' of {cfg}` (an intermediate output, not kept)" in card
    assert "an earlier merge by its name where a model goes" in card


def test_the_remapped_ids_warning_names_the_earlier_merge(zoo: Path, tmp_path: Path, caplog) -> None:
    """The final reads `ab` and a copy of a with two words' ids exchanged: the run's warning of
    ids merged id by id names `ab` as a merge of the file, not by its work folder."""
    models = Path(shutil.copytree(zoo, tmp_path / "models"))
    shutil.copytree(models / "a", models / "a-swapped")
    _swap_words(models / "a-swapped", "w3", "w4")
    final = {"merge_method": "linear", "models": [{"model": "ab", "parameters": {"weight": 0.5}},
                                                  {"model": str(models / "a-swapped"), "parameters": {"weight": 0.5}}],
             **VOCAB_F32}
    cfg = _write(tmp_path / "multi.yaml", [{**_first(models), "tokenizer_source": "base"}, final])
    caplog.set_level(logging.WARNING)
    assert _merge(cfg, "--out", tmp_path / "merged") == 0
    [line] = [r.getMessage() for r in caplog.records if "token id(s) to different tokens" in r.getMessage()]
    assert line.startswith(f"models 'ab' (merge 'ab' of {cfg}) and ") and ".plan-" not in line, line
    caplog.clear()
    assert _merge(cfg, "--out", tmp_path / "dry", "--dry-run") == 0  # the dry run says the same
    [dry] = [r.getMessage() for r in caplog.records if "token id(s) to different tokens" in r.getMessage()]
    assert dry == line


# ---- 2. --intermediate-dir ----------------------------------------------------------------------

def test_intermediate_dir_keeps_the_named_merges_as_mergekit_multi_does(models: Path, tmp_path: Path,
                                                                          capsys, caplog) -> None:
    """DIR/tied holds mergekit-multi's intermediate (to the oracle tolerance) and stays after the
    run, with its record; the final's weights are those of a run without the option, and its card
    says where `tied` is kept. Run again into another --out, DIR/tied is reused untouched."""
    caplog.set_level(logging.WARNING)
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = tmp_path / "inter"
    assert _merge(cfg, "--out", tmp_path / "ours", "--intermediate-dir", keep) == 0
    assert f"intermediates kept in {keep}" in capsys.readouterr().out
    assert sorted(p.name for p in keep.iterdir()) == ["tied", "tied.key.json"] and _leftovers(tmp_path) == []
    run_mergekit_multi(cfg, tmp_path / "theirs", tmp_path / "mk-inter")
    for ours, theirs in ((keep / "tied", tmp_path / "mk-inter" / "tied"), (tmp_path / "ours", tmp_path / "theirs")):
        a, b = load_all(ours), load_all(theirs)
        assert set(a) == set(b) and a
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)
    assert _merge(cfg, "--out", tmp_path / "plain") == 0
    assert _weights(tmp_path / "ours") == _weights(tmp_path / "plain")
    info = json.loads((tmp_path / "ours" / "simmerge_merge.json").read_text())
    assert info["model_paths"]["tied"] == str(keep / "tied")
    assert f"(an intermediate output, kept in {keep / 'tied'})" in (tmp_path / "ours" / "README.md").read_text()
    kept, inode = tree_hash(keep), (keep / "tied").stat().st_ino
    caplog.clear()
    assert _merge(cfg, "--out", tmp_path / "again", "--intermediate-dir", keep) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out
    assert f"reusing merge(s) 'tied' kept in {keep}" in caplog.text
    assert tree_hash(keep) == kept and (keep / "tied").stat().st_ino == inode
    assert _weights(tmp_path / "again") == _weights(tmp_path / "plain")


def test_an_interrupted_run_with_intermediate_dir_resumes_from_it(models: Path, tmp_path: Path, capsys,
                                                                   caplog) -> None:
    """The final fails (m3 corrupt): DIR/tied stays, no work folder beside --out; mended, the same
    command merges only the final."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep, out = tmp_path / "inter", tmp_path / "merged"
    shard, raw = _corrupt(models / "m3")
    assert _merge(cfg, "--out", out, "--intermediate-dir", keep) == 2
    one_line_error(capsys, "simmerge merge: error: ")
    assert not out.exists() and _leftovers(tmp_path) == [] and (keep / "tied.key.json").is_file()
    shard.write_bytes(raw)
    assert _merge(cfg, "--out", out, "--intermediate-dir", keep) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _weights(out) == _weights(tmp_path / "fresh")


def test_a_folder_simmerge_did_not_write_is_refused_even_with_overwrite(models: Path, tmp_path: Path, capsys,
                                                                        no_ray) -> None:
    """DIR/tied written by mergekit-multi (its --lazy would reuse it, whatever made it): refused
    with one line naming it, --overwrite or not; nothing in DIR changes, no --out."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = tmp_path / "inter"
    run_mergekit_multi(cfg, tmp_path / "theirs", keep)
    capsys.readouterr()  # mergekit's progress bar
    before = tree_hash(keep)
    for extra in ([], ["--overwrite"]):
        assert _merge(cfg, "--out", tmp_path / "merged", "--intermediate-dir", keep, *extra) == 2
        one_line_error(capsys, "simmerge merge: error: ", f"{keep / 'tied'}: not written by simmerge",
                       "--intermediate-dir")
        assert tree_hash(keep) == before and not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["config", "edited"])
def test_a_stale_intermediate_is_replaced_only_with_overwrite(models: Path, tmp_path: Path, capsys, change: str
                                                              ) -> None:
    """DIR/tied simmerge wrote for another `tied` (a weight changed since), or edited since it was
    recorded (its config.json rewritten): one line naming it, nothing changed; with --overwrite
    it is merged again and the output is the fresh run's."""
    docs = _two_stage(models)
    keep = tmp_path / "inter"
    if change == "config":
        docs[0]["models"][0]["parameters"]["weight"] = 0.9
    cfg = _write(tmp_path / "multi.yaml", docs)
    assert _merge(cfg, "--out", tmp_path / "first", "--intermediate-dir", keep) == 0
    if change == "config":
        cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    else:
        config = keep / "tied" / "config.json"
        config.write_text(config.read_text() + "\n")
    before = tree_hash(keep)
    out = tmp_path / "merged"
    assert _merge(cfg, "--out", out, "--intermediate-dir", keep) == 2
    one_line_error(capsys, "simmerge merge: error: ", f"{keep / 'tied'}: written by simmerge for other configs",
                   "--overwrite")
    assert tree_hash(keep) == before and not out.exists()
    assert _merge(cfg, "--out", out, "--intermediate-dir", keep, "--overwrite") == 0
    assert f"2 merge(s); intermediates kept in {keep} in " in capsys.readouterr().out
    assert _merge(cfg, "--out", tmp_path / "fresh") == 0
    assert _weights(out) == _weights(tmp_path / "fresh")


@pytest.mark.parametrize("case", ["single document", "plan", "a file", "inside --out", "holds an input",
                                  "--out in it"])
def test_intermediate_dir_where_it_makes_no_sense_is_one_line(family: Path, tmp_path: Path, capsys, no_ray,
                                                             case: str) -> None:
    docs = _two_stage(family)
    cfg = _write(tmp_path / "multi.yaml", docs)
    out, keep = tmp_path / "merged", tmp_path / "inter"
    args: list = [cfg]
    needle = "--intermediate-dir"
    if case == "single document":
        cfg = _write(tmp_path / "one.yaml", [{k: v for k, v in docs[0].items() if k != "name"}])
        args, needle = [cfg], f"--intermediate-dir: {cfg} is a single merge config"
    elif case == "plan":
        plan, cat = _plan_files(family, tmp_path)
        args = ["--plan", plan, "--catalog", cat]
    elif case == "a file":
        keep.write_text("notes")
        needle = f"--intermediate-dir {keep}: not a folder"
    elif case == "inside --out":
        keep = out / "inter"
        needle = f"--intermediate-dir {keep}: is or lies inside --out"
    elif case == "holds an input":
        keep = family.parent
        needle = "--intermediate-dir: "
    elif case == "--out in it":
        out = keep / "tied"
        needle = f"--out {out}: is where --intermediate-dir keeps merge 'tied'"
    before, parent = tree_hash(family), sorted(p.name for p in tmp_path.iterdir())
    assert _merge(*args, "--out", out, "--intermediate-dir", keep) == 2
    one_line_error(capsys, "simmerge merge: error: ", needle)
    assert tree_hash(family) == before and sorted(p.name for p in tmp_path.iterdir()) == parent


# ---- 3. the dry run counts only what a run would merge -----------------------------------------

def _dry(*args: str | Path, capsys) -> list[str]:
    assert _merge(*args, "--dry-run") == 0
    return capsys.readouterr().out.splitlines()


def test_the_dry_run_skips_the_merges_an_interrupted_run_kept(models: Path, tmp_path: Path, capsys, caplog
                                                             ) -> None:
    """After a run that failed in the final, the dry run says `tied` is resumed from the kept work
    folder and counts the final only (its read, its time; no intermediate disk), moving nothing;
    the run then resumes as it said."""
    cfg, out, shard, raw, work = _interrupted(_two_stage(models), models / "m3", tmp_path, capsys, caplog)
    shard.write_bytes(raw)
    full = _dry(cfg, "--out", tmp_path / "elsewhere", capsys=capsys)  # nothing kept for that --out
    kept = tree_hash(work)
    lines = _dry(cfg, "--out", out, capsys=capsys)
    assert "1 to run, 1 not (an earlier run kept what they make)" in lines[0]
    assert lines[1] == (f"  tied: resumed from {work / 'tied'} (kept by an earlier run for the same configs and "
                        "files); not merged again")
    assert lines[2] == full[2]  # the final's line is unchanged
    total = lines[3]
    final_read = full[2].split("read ", 1)[1].split(",", 1)[0]
    assert total.startswith(f"total: read {final_read}, ") and "intermediates need at most 0 B beside the output" \
        in total and "kept by an earlier run there already" in total, total
    assert full[3] != total and tree_hash(work) == kept and [tmp_path / n for n in _leftovers(tmp_path)] == [work]
    assert _merge(cfg, "--out", out) == 0
    assert "1 merge(s), resuming" in capsys.readouterr().out


def test_the_dry_run_with_intermediate_dir_reuses_and_checks_as_the_run(models: Path, tmp_path: Path, capsys
                                                                        ) -> None:
    """With --intermediate-dir, an empty DIR: both merges counted and the intermediate's disk in
    DIR; after a run, `tied` is resumed from DIR/tied; a stale DIR/tied is refused by the dry run
    as by the run."""
    cfg = _write(tmp_path / "multi.yaml", _two_stage(models))
    keep = tmp_path / "inter"
    first = _dry(cfg, "--out", tmp_path / "a", "--intermediate-dir", keep, capsys=capsys)
    assert "not (an earlier run" not in first[0] and f"in {keep} at once" in first[3] and not keep.exists()
    assert _merge(cfg, "--out", tmp_path / "a", "--intermediate-dir", keep) == 0
    capsys.readouterr()
    lines = _dry(cfg, "--out", tmp_path / "b", "--intermediate-dir", keep, capsys=capsys)
    assert lines[1].startswith(f"  tied: resumed from {keep / 'tied'} ") and "1 to run, 1 not" in lines[0]
    assert f"intermediates need at most 0 B in {keep} at once" in lines[3]
    (keep / "tied" / "config.json").write_text("{}")
    assert _merge(cfg, "--out", tmp_path / "b", "--intermediate-dir", keep, "--dry-run") == 2
    one_line_error(capsys, "simmerge merge: error: ", f"{keep / 'tied'}: written by simmerge for other configs")


def test_the_plan_dry_run_skips_the_steps_an_interrupted_run_kept(models: Path, tmp_path: Path, capsys) -> None:
    """`merge --plan --dry-run` after a plan run that failed in step 3: step 2 (which chains step
    1) is resumed from, step 1 is not needed, step 3 alone is counted."""
    plan, cat = _plan_files(models, tmp_path)
    out = tmp_path / "merged"
    shard, raw = _corrupt(models / "m4")
    args = ["merge", "--plan", str(plan), "--catalog", str(cat), "--out", str(out), "--workers", "1", "--quiet"]
    assert cli_main(args) == 2
    capsys.readouterr()
    shard.write_bytes(raw)
    assert cli_main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1 to run, 2 not" in lines[0], lines
    assert lines[1] == "  step-1: not merged (only merges resumed from an earlier run read it)"
    assert lines[2].startswith("  step-2: resumed from ") and lines[3].startswith("  step-3: read ")
    assert cli_main(args) == 0
    assert "resuming after step 2 of 3" in capsys.readouterr().out
