"""`simmerge merge --plan` resumes an interrupted run: a 3-step plan whose third model's tensor
data is corrupt (header intact, so every up-front check passes) fails in step 3; the same command
run again reuses steps 1-2 kept in the work folder, unless a model they read changed. Real
checkpoints, real merges; the interruption is the file's bytes, not a mock."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError, SimMergeError
from simmerge_ray.io.owner import OWNER_FILE, _start_time
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.executor import ExecOptions
from simmerge_ray.planner.execute import execute_plan
from simmerge_ray.planner.plan import Plan
from merge_families import family_fixtures  # beside this file
from input_checks import one_line_error, tree_hash  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)
MODELS = ["m1", "m2", "m3", "m4"]
OPERATORS = ["ties", "slerp", "slerp"]
WORK = ".merged.plan-"


family, models = family_fixtures(SPEC, "resume-models")


def _files(models: Path, tmp_path: Path, checkpoints: dict | None = None) -> tuple[Path, Path]:
    """plan.json and catalog.yaml for the 3-step plan m1 -ties-> m2 -slerp-> m3 -slerp-> m4
    (`checkpoints`: the models' fingerprints and stat signatures it records, as `simmerge plan`'s)."""
    plan = tmp_path / "plan.json"
    plan.write_text(Plan(task="code", models=MODELS, operators=OPERATORS, checkpoints=checkpoints or {}).to_json())
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"base": str(models / "base"),
                                   "models": [{"name": m, "path": str(models / m)} for m in MODELS]}))
    return plan, cat


def _corrupt(model: Path) -> tuple[Path, bytes]:
    """Fill the first tensor's bytes of the first shard with 0xFF (NaN in every float dtype),
    the header intact: only reading the data finds it. Returns the shard and its old bytes."""
    shard = sorted(model.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    begin, end = min(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    with open(shard, "r+b") as f:
        f.seek(8 + n + begin)
        f.write(b"\xff" * (end - begin))
    return shard, raw


def _retrain(model: Path) -> None:
    """Same names and shapes, other weights."""
    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, shard, metadata={"format": "pt"})


def _work(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(WORK))


def _shard_stat(step: Path) -> list[tuple[int, int]]:
    return [(f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(step.glob("*.safetensors"))]


def _run(plan: Path, cat: Path, out: Path) -> int:
    return cli_main(["merge", "--plan", str(plan), "--catalog", str(cat), "--out", str(out), "--workers", "1"])


def _output(out: Path) -> dict[str, bytes]:
    """Every file of an output; the work folder's random name, which the recorded config and
    provenance name as the last step's input, read as `WORK`."""
    return {str(p.relative_to(out)): re.sub(rb"\.[a-z]+\.plan-[0-9a-f]{8}", b"WORK", p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file()}


def _execute(models: Path, tmp_path: Path, out: Path, checkpoints: dict | None = None) -> list:
    """execute_plan of the plan over `models` into `out` (its MergeResults: one per step run)."""
    plan, cat = _files(models, tmp_path, checkpoints)
    return execute_plan(Plan.load(plan), Catalog.load(cat), out, ExecOptions(workers=1), plan_file=plan)


def _fresh(models: Path, tmp_path: Path, name: str, checkpoints: dict | None = None) -> dict[str, bytes]:
    """The output of an uninterrupted run of the plan over `models` into another folder."""
    assert len(_execute(models, tmp_path, tmp_path / name, checkpoints)) == 3
    return _output(tmp_path / name)


def test_an_interrupted_plan_resumes_after_its_kept_steps(models: Path, tmp_path: Path, capsys, caplog) -> None:
    """Step 3 fails: steps 1-2 were redone by every rerun (the work folder went whatever happened)."""
    caplog.set_level(logging.WARNING)
    plan, cat = _files(models, tmp_path)
    untouched = tree_hash(models)
    out = tmp_path / "merged"
    shard, raw = _corrupt(models / "m4")
    corrupt = tree_hash(models)

    assert _run(plan, cat, out) == 2
    one_line_error(capsys, "simmerge merge: error: ")
    assert not out.exists()
    [work] = _work(tmp_path)
    # step 1 went once step 2 was there: step 2's key chains it
    assert sorted(p.name for p in work.iterdir()) == [OWNER_FILE, "step-2", "step-2.key.json"]
    assert f"kept steps 1-2 of 3 of the plan in {work}" in caplog.text
    kept = _shard_stat(work / "step-2")
    assert tree_hash(models) == corrupt

    caplog.clear()  # a rerun that fails again keeps the very same step 2, untouched
    assert _run(plan, cat, out) == 2
    one_line_error(capsys, "simmerge merge: error: ")
    [again] = _work(tmp_path)
    assert "resuming the plan after step 2 of 3" in caplog.text and str(work) in caplog.text
    assert _shard_stat(again / "step-2") == kept

    shard.write_bytes(raw)  # the model mended: the same command finishes the plan
    assert tree_hash(models) == untouched
    assert _run(plan, cat, out) == 0
    printed = capsys.readouterr().out
    assert "1 step(s), resuming after step 2 of 3" in printed, printed
    assert _work(tmp_path) == [] and tree_hash(models) == untouched
    assert _output(out) == _fresh(models, tmp_path, "fresh")  # byte for byte, model card included


def test_a_changed_first_model_invalidates_the_kept_steps(models: Path, tmp_path: Path, caplog) -> None:
    """Step 1 reads m1: retrained, the kept steps are another merge's; all 3 run again and the
    old work folder (this process's, no longer in use) is removed."""
    caplog.set_level(logging.WARNING)
    shard, raw = _corrupt(models / "m4")
    with pytest.raises(SimMergeError):
        _execute(models, tmp_path, tmp_path / "merged")
    assert len(_work(tmp_path)) == 1
    shard.write_bytes(raw)
    _retrain(models / "m1")
    caplog.clear()
    results = _execute(models, tmp_path, tmp_path / "merged")
    assert len(results) == 3 and "resuming" not in caplog.text
    assert _work(tmp_path) == []
    assert _output(tmp_path / "merged") == _fresh(models, tmp_path, "fresh")


def test_a_model_only_a_later_step_reads_keeps_the_earlier_steps(models: Path, tmp_path: Path) -> None:
    """m4 is read by step 3 alone: replaced by another checkpoint, steps 1-2 are still valid."""
    shard, raw = _corrupt(models / "m4")
    with pytest.raises(SimMergeError):
        _execute(models, tmp_path, tmp_path / "merged")
    shard.write_bytes(raw)
    _retrain(models / "m4")
    assert len(_execute(models, tmp_path, tmp_path / "merged")) == 1
    assert _work(tmp_path) == []
    assert _output(tmp_path / "merged") == _fresh(models, tmp_path, "fresh")


def test_a_step_without_its_key_is_not_reused(models: Path, tmp_path: Path) -> None:
    """A run killed between publishing step 2 and writing its key leaves a folder that cannot be
    proven to be this plan's: recomputed, and the old work folder removed."""
    shard, raw = _corrupt(models / "m4")
    with pytest.raises(SimMergeError):
        _execute(models, tmp_path, tmp_path / "merged")
    [work] = _work(tmp_path)
    (work / "step-2.key.json").unlink()
    shard.write_bytes(raw)
    assert len(_execute(models, tmp_path, tmp_path / "merged")) == 3
    assert _work(tmp_path) == []


def test_a_live_processes_work_folder_is_neither_taken_nor_removed(models: Path, tmp_path: Path) -> None:
    """A folder another live process owns (a concurrent run of the same --out) is left alone."""
    shard, raw = _corrupt(models / "m4")
    with pytest.raises(SimMergeError):
        _execute(models, tmp_path, tmp_path / "merged")
    [work] = _work(tmp_path)
    record = json.loads((work / OWNER_FILE).read_text())
    parent = os.getppid()  # alive, and not this process
    (work / OWNER_FILE).write_text(json.dumps({**record, "pid": parent, "start": _start_time(parent)}))
    before = tree_hash(work)
    shard.write_bytes(raw)
    assert len(_execute(models, tmp_path, tmp_path / "merged")) == 3
    assert _work(tmp_path) == [work] and tree_hash(work) == before


def _shard_copied_over_itself(model: Path) -> None:
    """`cp -p` of a shard over itself: the same bytes, size and mtime; a new change time."""
    shard = sorted(model.glob("*.safetensors"))[0]
    subprocess.run(["cp", "-p", str(shard), str(model / "copy")], check=True)
    subprocess.run(["cp", "-p", str(model / "copy"), str(shard)], check=True)
    (model / "copy").unlink()


def _shard_replaced_keeping_size_and_mtime(model: Path) -> None:
    """Other weights of the same size, the old mtime put back (what `rsync -a` of a retrained
    model of the same shape leaves): a size-and-mtime key takes it for the old file."""
    shard = sorted(model.glob("*.safetensors"))[0]
    st = shard.stat()
    _retrain(model)
    assert shard.stat().st_size == st.st_size
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tokenizer_edited(model: Path) -> None:
    """A token's text changed: a merge's tokenizer (union, base) and chat template come from here."""
    path = model / "tokenizer_config.json"
    path.write_text(path.read_text().replace("<|pad|>", "<|padding|>"))


def _read(model: Path) -> None:
    """Every file read (a fingerprint, a copy elsewhere), none written."""
    tree_hash(model)
    shutil.copytree(model, model.parent / "elsewhere")


@pytest.mark.parametrize("change, resumed", [
    (_read, True),
    (_tokenizer_edited, False),
    (_shard_copied_over_itself, False),
    (_shard_replaced_keeping_size_and_mtime, None),  # None: the plan's own check refuses the model
], ids=["read only", "tokenizer edited", "cp -p over itself", "same size and mtime"])
def test_a_kept_step_stands_for_the_very_same_files(models: Path, tmp_path: Path, caplog, change,
                                                    resumed: bool | None) -> None:
    """Steps 1-2 read m1, which has a tokenizer_config.json: a kept step is reused only while
    every file of m1 a merge reads or copies is the very same file (path, size, mtime, inode,
    change time). Reading m1 keeps it; an edited tokenizer file, a shard copied over itself with
    its bytes and mtime (`cp -p`), or other weights of the same size under the old mtime, make
    all 3 steps run again, to the output of an uninterrupted run. The plan records m1's
    fingerprint and stat signature as `simmerge plan` does: no stand-in for the files (it once
    was, so the last two resumed); other weights under the old size and mtime are, moreover, not
    the model the plan was made for (its signature holds the inode and ctime too): refused before
    any step, the kept step left where it is."""
    from simmerge_ray.io.checkpoint import Checkpoint

    caplog.set_level(logging.WARNING)
    (models / "m1" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    ck = Checkpoint.open(models / "m1")
    recorded = {"m1": {"fingerprint": ck.fingerprint(), "signature": ck.stat_signature()}}
    shard, raw = _corrupt(models / "m4")
    with pytest.raises(SimMergeError):
        _execute(models, tmp_path, tmp_path / "merged", recorded)
    shard.write_bytes(raw)
    change(models / "m1")
    caplog.clear()
    if resumed is None:
        kept = _work(tmp_path)
        with pytest.raises(ConfigError, match=r"model 'm1' .* is not the checkpoint the plan was made for"):
            _execute(models, tmp_path, tmp_path / "merged", recorded)
        assert _work(tmp_path) == kept != []
        return
    results = _execute(models, tmp_path, tmp_path / "merged", recorded)
    assert len(results) == (1 if resumed else 3)
    assert ("resuming the plan after step 2 of 3" in caplog.text) == resumed
    assert _work(tmp_path) == []
    assert _output(tmp_path / "merged") == _fresh(models, tmp_path, "fresh", recorded)
