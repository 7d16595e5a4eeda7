"""`simmerge merge --plan PLAN.json --catalog CATALOG.yaml` on bad or unusual input as a new user
gives it (a hand-edited plan, a catalog whose model was replaced, a bad --dtype, an empty --out
folder, --seed): one line, exit 2, naming the file or option, with the inputs unchanged and
nothing written. Each case here once printed a traceback-ish or misleading line, ran for steps
before failing, left folders behind, or ignored the option."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint, make_family
from simmerge_ray.planner.plan import Plan
from input_checks import tree_hash  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, m1..m3; `wide`: a model of another hidden size; `nan3`: m3 with a NaN weight."""
    root = make_family(tmp_path_factory.mktemp("plan-models"), SPEC, n=3)
    make_checkpoint(root / "wide", SyntheticSpec(architecture="llama", hidden_size=48, num_layers=2, num_heads=4,
                                                 vocab_size=64, max_shard_bytes=20_000, seed=9))
    shutil.copytree(root / "m3", root / "nan3")
    shard = sorted((root / "nan3").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return root


def _catalog(models: Path, tmp_path: Path, m3: str = "m3", base: bool = True, name: str = "catalog.yaml") -> Path:
    cat = tmp_path / name
    raw = {"models": [{"name": f"m{i}", "path": str(models / (m3 if i == 3 else f"m{i}"))} for i in (1, 2, 3)]}
    if base:
        raw["base"] = str(models / "base")
    cat.write_text(yaml.safe_dump(raw))
    return cat


def _plan(tmp_path: Path, operators: list[str], models: list[str] | None = None, name: str = "plan.json",
          **edits) -> Path:
    models = models or ["m1", "m2", "m3"][:len(operators) + 1]
    raw = json.loads(Plan(task="code", models=models, operators=operators).to_json())
    raw.update(edits)
    f = tmp_path / name
    f.write_text(json.dumps(raw))
    return f


def _refused(models: Path, tmp_path: Path, capsys, argv: list[str], out: Path) -> str:
    """Run `merge`; assert exit 2, one line without a traceback, nothing written beside the plan
    (no --out, no work folder, no parent folder made for it) and the models unchanged; the line."""
    before, listing = tree_hash(models), sorted(p.name for p in tmp_path.iterdir())
    rc = cli_main(["merge", *argv, "--out", str(out), "--workers", "1"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": warning: " not in ln]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert tree_hash(models) == before
    return err[0]


@pytest.mark.parametrize("case, needle", [
    # A list or mapping as the weighting: "not a plan file (unhashable type: 'list')".
    ("weighting-list", "{plan}: weighting: expected one of half, equal, anchor or null, got [0.5, 0.5]"),
    # A field of a newer version: "not a plan file (Plan.__init__() got an unexpected keyword argument ...)".
    ("unknown-field", "{plan}: unknown field 'version' (a plan written by another simmerge version?); known: task, "),
    ("missing-field", "{plan}: not a plan file (missing field 'task')"),
    # Named neither the plan nor the catalog: "plan names models absent from the catalog: zz".
    ("absent-model", "{plan}: models: zz not in {catalog} (it has: m1, m2, m3)"),
    ("absent-model-linear", "{plan}: models: zz not in {catalog} (it has: m1, m2, m3)"),
    # Named neither file: "arm 'ties' (ties) needs the catalog's base model".
    ("no-base", "{catalog}: no base, and step 1 of {plan} runs 'ties', which merges task vectors against the "
                "catalog's base"),
], ids=["weighting-list", "unknown-field", "missing-field", "absent-model", "absent-model-linear", "no-base"])
def test_a_hand_edited_plan_names_the_file_and_field(models: Path, tmp_path: Path, capsys, case: str,
                                                     needle: str) -> None:
    catalog = _catalog(models, tmp_path, base=case != "no-base")
    if case == "weighting-list":
        plan = _plan(tmp_path, ["slerp", "linear"], weighting=[0.5, 0.5])
    elif case == "unknown-field":
        plan = _plan(tmp_path, ["slerp", "linear"], version=3)
    elif case == "missing-field":
        plan = _plan(tmp_path, ["slerp", "linear"])
        raw = json.loads(plan.read_text())
        del raw["task"]
        plan.write_text(json.dumps(raw))
    elif case.startswith("absent-model"):
        plan = _plan(tmp_path, ["linear", "linear"] if case.endswith("linear") else ["slerp", "linear"],
                     models=["m1", "m2", "zz"])
    else:
        plan = _plan(tmp_path, ["ties", "linear"])
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(catalog)], tmp_path / "merged")
    assert needle.format(plan=plan, catalog=catalog) in line, line


def test_a_bad_dtype_names_the_option(models: Path, tmp_path: Path, capsys) -> None:
    """Was 'plan step 1: out_dtype: unknown dtype' (or 'plan (folded): ...'): no such key in any file."""
    plan, catalog = _plan(tmp_path, ["slerp", "linear"]), _catalog(models, tmp_path)
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(catalog), "--dtype", "int4"],
                    tmp_path / "merged")
    assert line.startswith("simmerge merge: error: --dtype: unknown dtype 'int4'; use one of"), line


def test_a_replaced_catalog_model_is_refused_before_any_step(models: Path, tmp_path: Path, capsys) -> None:
    """m3 replaced by a model of another shape since planning: step 1 ran first, then step 2 failed
    naming the deleted work folder ('.merged.plan-xxxx/step-1'), and the parents made for --out stayed."""
    plan, catalog = _plan(tmp_path, ["slerp", "linear"]), _catalog(models, tmp_path, m3="wide")
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(catalog)],
                    tmp_path / "new" / "deep" / "merged")
    assert f"model '{models / 'wide'}'" in line and "has shape [64, 48]" in line and f"'{models / 'm1'}'" in line
    assert ".plan-" not in line


def test_a_first_step_that_fails_leaves_no_folders(models: Path, tmp_path: Path, capsys) -> None:
    """A NaN in m3 (headers fine) fails step 1 of m3 -slerp-> m1 -linear-> m2: nothing finished,
    so the work folder goes, with the parent folders made for it (--out new/deep/merged), which
    once stayed behind."""
    plan = _plan(tmp_path, ["slerp", "linear"], models=["m3", "m1", "m2"])
    catalog = _catalog(models, tmp_path, m3="nan3")
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(catalog)],
                    tmp_path / "new" / "deep" / "merged")
    assert "NaN" in line or "non-finite" in line or "nonfinite" in line, line


def test_a_later_step_that_fails_keeps_the_finished_steps(models: Path, tmp_path: Path, capsys) -> None:
    """A NaN in m3 fails step 2: step 1 is kept in the work folder, for the same command to resume
    from (test_plan_resume.py), and nothing else is written; the models are unchanged."""
    plan, catalog = _plan(tmp_path, ["slerp", "linear"]), _catalog(models, tmp_path, m3="nan3")
    before, out = tree_hash(models), tmp_path / "new" / "deep" / "merged"
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(catalog), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("NaN" in err[0] or "non-finite" in err[0]), err
    [work] = list(out.parent.iterdir())
    assert work.name.startswith(".merged.plan-") and (work / "step-1" / "config.json").is_file()
    assert tree_hash(models) == before


@pytest.mark.parametrize("operators", [["slerp", "linear"], ["linear", "linear"]])
def test_an_empty_out_folder_is_used(models: Path, tmp_path: Path, operators: list[str]) -> None:
    """An empty --out folder is used as it is for a config; a plan refused it as 'already exists'."""
    plan, catalog = _plan(tmp_path, operators), _catalog(models, tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(catalog), "--out", str(out), "--workers", "1"]) == 0
    assert (out / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_seed_reaches_a_plans_stochastic_step(models: Path, tmp_path: Path) -> None:
    """--seed was ignored by --plan: a DARE step gave the same bytes for every seed, and the card said none."""
    plan, catalog = _plan(tmp_path, ["dare_ties"]), _catalog(models, tmp_path)
    for seed in (0, 7):
        assert cli_main(["merge", "--plan", str(plan), "--catalog", str(catalog), "--out", str(tmp_path / f"s{seed}"),
                         "--workers", "1", "--seed", str(seed)]) == 0
    a, b = (load_file(tmp_path / f"s{seed}" / "model.safetensors") for seed in (0, 7))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "s7" / "simmerge_merge.json").read_text())["seed"] == 7


def test_a_ray_plan_is_checked_before_ray_starts(models: Path, tmp_path: Path, capsys, no_ray) -> None:
    """With --ray, Ray was started before the plan's models were looked at (no_ray fails a start)."""
    plan, catalog = _plan(tmp_path, ["slerp", "linear"]), _catalog(models, tmp_path, m3="wide")
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(catalog), "--ray"],
                    tmp_path / "merged")
    assert "has shape [64, 48]" in line


def test_a_model_changed_since_the_plan_is_refused(models: Path, tmp_path: Path, capsys) -> None:
    """A plan carries the checkpoints its features were measured from; a catalog model retrained or
    replaced (same shapes) between `simmerge plan` and `merge --plan` was merged without a word by a
    plan made from another model's features. A copy elsewhere (same content) still merges."""
    from simmerge_ray.features.provenance import META_FILE, checkpoint_record, measured_checkpoints
    from simmerge_ray.io.checkpoint import Checkpoint

    work = tmp_path / "models"
    shutil.copytree(models, work)  # copy2 keeps the modification times: the stat signatures hold
    feats = tmp_path / "features"
    feats.mkdir()
    (feats / META_FILE).write_text(json.dumps(checkpoint_record({m: Checkpoint.open(work / m) for m in ("m1", "m2")})))
    recorded = measured_checkpoints(feats, ["m1", "m2", "m3"])
    assert sorted(recorded) == ["m1", "m2"]  # m3 was never measured: nothing to check it against
    plan = _plan(tmp_path, ["linear"], checkpoints=recorded)
    cat = _catalog(work, tmp_path)
    merge = ["merge", "--plan", str(plan), "--catalog", str(cat), "--workers", "1"]
    assert cli_main([*merge, "--out", str(tmp_path / "same")]) == 0
    moved = tmp_path / "m2-moved"
    shutil.copytree(work / "m2", moved)
    cat.write_text(cat.read_text().replace(str(work / "m2"), str(moved)))
    assert cli_main([*merge, "--out", str(tmp_path / "moved")]) == 0  # another path, same content
    shard = sorted(moved.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2  # retrained: same names and shapes, other weights
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _refused(work, tmp_path, capsys, [*merge[1:5]], tmp_path / "changed")
    assert line.endswith(f"{plan}: model 'm2' ({moved}) is not the checkpoint the plan was made for (its content "
                         f"changed since `simmerge plan`); compute its features and plan again"), line


def test_a_model_retrained_in_place_with_its_old_time_is_refused(models: Path, tmp_path: Path, capsys) -> None:
    """Fine-tunes of one architecture have one size, and `rsync -a`, `cp -p` or an unpacked archive
    keep the old modification time: a stat signature of path, size and mtime alone matched, and the
    plan merged a model it was not made for. The inode and ctime (only the kernel sets it) tell."""
    from simmerge_ray.features.provenance import META_FILE, checkpoint_record, measured_checkpoints
    from simmerge_ray.io.checkpoint import Checkpoint

    work = tmp_path / "models"
    shutil.copytree(models, work)
    feats = tmp_path / "features"
    feats.mkdir()
    (feats / META_FILE).write_text(json.dumps(checkpoint_record({m: Checkpoint.open(work / m) for m in ("m1", "m2")})))
    plan = _plan(tmp_path, ["linear"], checkpoints=measured_checkpoints(feats, ["m1", "m2"]))
    cat = _catalog(work, tmp_path)
    shard = sorted((work / "m2").glob("*.safetensors"))[0]
    st = shard.stat()
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2  # same names, shapes and size; other weights
    retrained = tmp_path / "retrained.safetensors"
    save_file(tensors, retrained, metadata={"format": "pt"})
    os.replace(retrained, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    line = _refused(work, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(cat)], tmp_path / "merged")
    assert line.endswith(f"{plan}: model 'm2' ({work / 'm2'}) is not the checkpoint the plan was made for (its content "
                         f"changed since `simmerge plan`); compute its features and plan again"), line


def test_a_plan_s_base_changed_since_the_plan_is_refused(models: Path, tmp_path: Path, capsys) -> None:
    """The structural features measure task vectors against the base, and a TIES step merges
    against it; a catalog pointed at another base (or a base replaced in place) merged without a
    word, while a changed model was refused."""
    from simmerge_ray.features.provenance import META_FILE, checkpoint_record, measured_base
    from simmerge_ray.io.checkpoint import Checkpoint

    feats = tmp_path / "features"
    feats.mkdir()
    measured = {m: Checkpoint.open(models / m) for m in ("m1", "m2", "base")}
    (feats / META_FILE).write_text(json.dumps({"base": "base", **checkpoint_record(measured)}))
    assert measured_base(feats) == {"fingerprint": measured["base"].fingerprint(),
                                    "signature": measured["base"].stat_signature()}
    plan = _plan(tmp_path, ["ties"], base_checkpoint=measured_base(feats))
    cat = _catalog(models, tmp_path)
    assert cli_main(["merge", "--plan", str(plan), "--catalog", str(cat), "--out", str(tmp_path / "same"),
                     "--workers", "1"]) == 0
    rebased = shutil.copytree(models / "base", tmp_path / "base2")
    shard = sorted(rebased.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01  # another base of the same shapes
    save_file(tensors, shard, metadata={"format": "pt"})
    other = _catalog(models, tmp_path, name="other-base.yaml")
    other.write_text(other.read_text().replace(str(models / "base"), str(rebased)))
    line = _refused(models, tmp_path, capsys, ["--plan", str(plan), "--catalog", str(other)], tmp_path / "merged")
    assert line.endswith(f"{plan}: the catalog's base ({rebased}) is not the checkpoint the plan was made for "
                         f"(another folder, or its content changed since `simmerge plan`); compute the features and "
                         f"plan again"), line

