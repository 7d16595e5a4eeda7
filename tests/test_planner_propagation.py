"""Propagated weight features equal those of merges that were actually built (linear and SLERP
steps at the shares of a weighted fold); a linear plan runs as one folded merge."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.numpy import load_file, save_file

from simmerge_ray.catalog import Catalog
from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.features.structural import StructuralOptions, compute_structural
from simmerge_ray.io.owner import OWNER_FILE
from simmerge_ray.io.safetensors_format import read_header
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.planner.gram_file import AGAIN
from simmerge_ray.planner.plan import Plan
from benchmarks.proxy_stats import compare_columns, ranks, spearman, summarize_families
from simmerge_ray.planner.propagate import (
    GramTable, PairLookup, initial_state, proxy_features, step_state, structural_features,
)

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=3, num_heads=4, vocab_size=64,
                     dtype="float32")
EXACT = ["weight_cos", "l2", "l2_rel", "tv_cos", "tv_norm_a", "tv_norm_b", "tv_norm_ratio"]


@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("prop")
    make_checkpoint(root / "base", SPEC)
    for i, std in ((1, 0.01), (2, 0.03), (3, 0.02)):
        make_checkpoint(root / f"m{i}", dataclasses.replace(SPEC, seed=i), base=root / "base", delta_std=std)
    # "anchor": step 1 is SLERP at t = 1/3, step 2 linear giving m3 a quarter
    plan = Plan("code", ["m1", "m2", "m3"], ["slerp", "linear"], weighting="anchor")
    step_by_step(plan, root, root)
    small = Catalog.from_dict({"base": "base", "models": [{"name": f"m{i}", "path": f"m{i}"} for i in (1, 2, 3)]},
                              root=root)
    big = Catalog.from_dict({"base": "base", "models": [{"name": n, "path": n} for n in
                                                        ("m1", "m2", "m3", "step-1", "step-2")]}, root=root)
    compute_structural(small, root / "feat-small", StructuralOptions(workers=1, use_cache=False))
    compute_structural(big, root / "feat-big", StructuralOptions(workers=1, use_cache=False))
    return {"root": root, "plan": plan}


def step_by_step(plan: Plan, models: Path, out: Path) -> Path:
    """Build every step of `plan` into out/step-<j> (float32); returns the last."""
    paths = {m: models / m for m in plan.models}
    for j, cfg in enumerate(plan.step_configs(paths, models / "base"), start=1):
        if j > 1:
            cfg = _replace_refs(cfg, f"step-{j - 1}", str(out / f"step-{j - 1}"))
        spec = MergeSpec.from_dict({**cfg, "out_dtype": "float32"}, root=out)
        run_merge(spec, out / f"step-{j}", ExecOptions(workers=1))
    return out / f"step-{plan.k - 1}"


def _replace_refs(node, old: str, new: str):
    if isinstance(node, dict):
        return {k: _replace_refs(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(v, old, new) for v in node]
    return new if node == old else node


def test_exact_features_of_built_merges(built: dict) -> None:
    root = built["root"]
    gt = GramTable.load(root / "feat-small")
    actual = pl.read_parquet(root / "feat-big" / "structural.parquet")
    arms = built["plan"].step_arms()
    assert (arms[0].params["t"], arms[1].share) == (pytest.approx(1 / 3), pytest.approx(1 / 4))
    s1 = step_state(gt, initial_state(gt, "m1"), "m2", arms[0])
    s2 = step_state(gt, s1, "m3", arms[1])
    checks = [(s1, "step-1", "m3"), (s1, "step-1", "m1"), (s2, "step-2", "m2"), (s2, "step-2", "m1")]
    got = structural_features(gt, [c[0] for c in checks], [c[2] for c in checks])
    compared = 0
    for i, (_, built_name, other) in enumerate(checks):
        row = actual.filter((pl.col("a") == built_name) & (pl.col("b") == other))
        assert row.height == 1
        for col, values in got.items():
            if not any(col.startswith(f"s_{f}") for f in EXACT) or row[col][0] is None:
                continue
            np.testing.assert_allclose(values[i], row[col][0], rtol=2e-5, atol=1e-9, err_msg=f"{col} {built_name}")
            compared += 1
    assert compared > 4 * 40  # every exact feature, globally, per group and per third
    # the slerp step is not a plain weighted mean: its coefficients differ from (2/3, 1/3)
    assert not np.allclose(s1.coef[:, 0], 2 / 3)
    assert s2.mix == pytest.approx({"m1": 0.5, "m2": 0.25, "m3": 0.25})


def test_proxy_is_mixture_of_component_features(built: dict) -> None:
    table = pl.DataFrame({"a": ["m1", "m2"], "b": ["m3", "m3"], "task": ["code", "code"],
                          "f_kl_ab_mean": [0.2, 0.6], "s_sign_agree": [0.5, 0.7]})
    gt = GramTable.load(built["root"] / "feat-small")
    state = step_state(gt, initial_state(gt, "m1"), "m2", "linear")
    lookup = PairLookup(table, ["f_kl_ab_mean", "s_sign_agree"])
    x = proxy_features(lookup, [state], ["m3"], "code")
    np.testing.assert_allclose(x[0], [0.4, 0.6])


def _damaged(features: Path, at: Path, how: str) -> Path:
    """A copy of a features folder with its Gram file or metadata damaged as `how` says."""
    shutil.copytree(features, at)
    path, t = at / "gram.safetensors", "lm_head.weight"
    grams = load_file(path)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "dropped":
        save_file({k: v for k, v in grams.items() if k != t}, path)
    elif how == "shape":
        save_file({**grams, t: grams[t][:3, :3].copy()}, path)
    elif how == "float32":
        save_file({**grams, t: grams[t].astype(np.float32)}, path)
    elif how in ("nan", "inf"):
        g = grams[t].copy()
        g[1, 2] = g[2, 1] = np.nan if how == "nan" else np.inf
        save_file({**grams, t: g}, path)
    elif how == "unlisted":
        save_file({**grams, "extra.weight": grams[t]}, path)
    elif how in ("asymmetric", "negative"):
        g = grams[t].copy()
        if how == "asymmetric":
            g[1, 2] += 1e-3 * np.abs(g).max()
        else:
            g[2, 2] = -abs(g[2, 2])
        save_file({**grams, t: g}, path)
    elif how == "no gram":
        path.unlink()
    elif how == "no meta":
        (at / "gram_meta.json").unlink()
    elif how == "meta":
        (at / "gram_meta.json").write_text(json.dumps({"models": ["m1"], "base": None}))
    return at


# how the folder is damaged -> (error, message); {g} the Gram file, {d} the folder
DAMAGES = {
    "truncated": (CheckpointError, "{g}: truncated: tensor {last!r} ends at byte {end} but the file has {size}"),
    "dropped": (CheckpointError, "{g}: tensor 'lm_head.weight' missing (gram_meta.json lists it); {again}"),
    "shape": (CheckpointError, "{g}: tensor 'lm_head.weight' is F64 [3, 3], expected F64 [4, 4] (one row per model "
                               "and base of gram_meta.json); {again}"),
    "float32": (CheckpointError, "{g}: tensor 'lm_head.weight' is F32 [4, 4], expected F64 [4, 4] (one row per "
                                 "model and base of gram_meta.json); {again}"),
    "nan": (CheckpointError, "{g}: tensor 'lm_head.weight': Gram matrix holds NaN (2 of 16 entries not finite); "
                             "{again}"),
    "inf": (CheckpointError, "{g}: tensor 'lm_head.weight': Gram matrix holds Inf (2 of 16 entries not finite); "
                             "{again}"),
    "unlisted": (CheckpointError, "{g}: tensor 'extra.weight' is not listed in gram_meta.json (the two files are "
                                  "of different runs?); {again}"),
    "asymmetric": (CheckpointError, "{g}: tensor 'lm_head.weight': not a Gram matrix (not symmetric, or a negative "
                                    "squared norm on its diagonal); {again}"),
    "negative": (CheckpointError, "{g}: tensor 'lm_head.weight': not a Gram matrix (not symmetric, or a negative "
                                  "squared norm on its diagonal); {again}"),
    "no gram": (ConfigError, "{d}: per-tensor Gram matrices missing ({g}); run `simmerge features structural` first"),
    "no meta": (ConfigError, "{d}: per-tensor Gram matrices missing ({d}/gram_meta.json); run `simmerge features "
                             "structural` first"),
    "meta": (ConfigError, "{d}/gram_meta.json: unreadable Gram metadata (KeyError: 'tensors'); {again}"),
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_a_damaged_gram_file_is_one_error_naming_file_and_tensor(built: dict, tmp_path: Path, how: str) -> None:
    """Damaged Gram matrices were tracebacks (SafetensorError, KeyError, ValueError), and one NaN
    gave plans with other scores and exit 0; a missing file was named 'None'."""
    error, message = DAMAGES[how]
    d = _damaged(built["root"] / "feat-small", tmp_path / "feat", how)
    g = d / "gram.safetensors"
    entries, _, _ = read_header(built["root"] / "feat-small" / "gram.safetensors")
    last = max(entries.values(), key=lambda e: e.end)  # truncated: the one that runs past the end
    with pytest.raises(error) as caught:
        GramTable.load(d)
    assert str(caught.value) == message.format(d=d, g=g, again=AGAIN, last=last.name, end=last.end,
                                               size=last.end - 100)


def test_gram_table_holds_the_file_values(built: dict) -> None:
    feat = built["root"] / "feat-small"
    gt = GramTable.load(feat)
    grams = load_file(feat / "gram.safetensors")
    assert gt.rows == ["m1", "m2", "m3", "base"] and gt.gram.shape == (len(grams), 4, 4)
    for i, t in enumerate(gt.tensors):
        np.testing.assert_array_equal(gt.gram[i], grams[t])
    assert np.isfinite(gt.gram).all() and gt.scopes[""].all() and gt.scopes["_mlp"].any()


def test_plan_executes_with_the_streaming_engine(built: dict, tmp_path: Path) -> None:
    from simmerge_ray.cli import main as cli_main
    from simmerge_ray.io.checkpoint import Checkpoint

    root, plan = built["root"], built["plan"]
    (tmp_path / "plan.json").write_text(plan.to_json())
    (tmp_path / "catalog.yaml").write_text(
        f"base: {root / 'base'}\nmodels:\n" + "".join(f"  - {{name: {m}, path: {root / m}}}\n" for m in plan.models))
    out = tmp_path / "merged"
    # A plan naming a model the catalog lacks: one error, and no work folder left beside --out.
    (tmp_path / "short.yaml").write_text(f"base: {root / 'base'}\nmodels:\n  - {{name: m1, path: {root / 'm1'}}}\n")
    assert cli_main(["merge", "--plan", str(tmp_path / "plan.json"), "--catalog", str(tmp_path / "short.yaml"),
                     "--out", str(out)]) == 2
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # The work folder of a `merge --plan` killed after its first step (its owner process is dead).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".merged.plan-0dead000"
    (stale / "step-1").mkdir(parents=True)
    (stale / "step-1" / "model.safetensors").write_bytes(b"an intermediate")
    (stale / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1"}))
    assert cli_main(["merge", "--plan", str(tmp_path / "plan.json"), "--catalog", str(tmp_path / "catalog.yaml"),
                     "--out", str(out), "--dtype", "float32", "--workers", "1"]) == 0
    got, want = Checkpoint.open(out), Checkpoint.open(root / "step-2")
    assert got.tensor_names == want.tensor_names
    for name in want.tensor_names:
        assert torch.equal(got.read(name), want.read(name))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # intermediates removed, stale too
    # The card names the catalog models and the plan's first step, not the step's temporary folder.
    card = (out / "README.md").read_text()
    prose = card[:card.index("### Configuration")]
    assert ".merged.plan-" not in card  # the config as run names step 1 `step-1`, not the deleted folder
    assert "step-1" in repr(yaml.safe_load((out / "mergekit_config.yml").read_text()))
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == [str(root / m) for m in ("m1", "m2", "m3", "base")]
    assert f"Step 2 of 2 of the plan `{tmp_path / 'plan.json'}` for task `code`: m1 -slerp-> m2 -linear-> m3." in prose
    assert "* `plan step 1: m1 -slerp-> m2` (an intermediate output, not kept)" in prose
    assert f"* `m3` ({root / 'm3'})" in prose
    info = json.loads((out / "simmerge_merge.json").read_text())
    assert list(info["plan"]["steps"].values()) == ["plan step 1: m1 -slerp-> m2"]
    assert info["plan"]["model_names"][str(root / "m3")] == "m3"
    assert cli_main(["merge", "--plan", str(tmp_path / "nope.json"), "--catalog", str(tmp_path / "catalog.yaml"),
                     "--out", str(tmp_path / "x")]) == 2


def test_proxy_accuracy_statistics() -> None:
    """The measures the proxy-accuracy job reports: rank correlation (ties share a rank) and
    relative error, per column and per feature family."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    np.testing.assert_allclose(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0.0, 2.5, 1.0])
    # ties: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3) -> Pearson of the ranks
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), x[:4]) == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
    assert np.isnan(spearman(np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, 3.0])))  # < 3 finite rows
    actual = np.column_stack([x, x, 10 * x])
    pred = np.column_stack([x, x[::-1], 10 * x + 1])
    cols = compare_columns(pred, actual, ["s_weight_cos", "s_sign_agree", "f_kl_ab_mean"])
    assert cols["s_weight_cos"]["max_abs"] == 0.0 and cols["s_sign_agree"]["spearman"] == pytest.approx(-1.0)
    assert cols["f_kl_ab_mean"]["rel_mae"] == pytest.approx(1 / 30) and cols["f_kl_ab_mean"]["spearman"] == pytest.approx(1.0)
    fams = summarize_families(cols)
    assert list(fams) == ["sign agreement (mixture)", "weight-space (Gram)", "KL (convexity bound)"]
    assert fams["weight-space (Gram)"]["spearman_median"] == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["half", "equal"])
def test_a_linear_plan_runs_as_one_folded_merge(built: dict, tmp_path: Path, weighting: str) -> None:
    from simmerge_ray.io.checkpoint import Checkpoint
    from simmerge_ray.planner.execute import execute_plan

    root = built["root"]
    plan = Plan("code", ["m1", "m2", "m3"], ["linear", "linear"], weighting=weighting)
    want = step_by_step(plan, root, tmp_path / "steps")
    catalog = Catalog.from_dict({"base": "base", "models": [{"name": m, "path": m} for m in plan.models]}, root=root)
    out = tmp_path / "work" / "folded"
    out.parent.mkdir()
    results = execute_plan(plan, catalog, out, ExecOptions(workers=1), out_dtype="float32")
    assert len(results) == 1  # one pass over the tensors
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded"]  # no intermediate checkpoint
    coef = plan.fold.linear_coefficients()
    expected = {"half": [0.25, 0.25, 0.5], "equal": [1 / 3] * 3}[weighting]
    assert list(coef.values()) == pytest.approx(expected)
    got, ref = Checkpoint.open(out), Checkpoint.open(want)
    for name in ref.tensor_names:
        if weighting == "half":  # shares that are powers of two round the same either way: same bytes
            assert torch.equal(got.read(name), ref.read(name)), name
        else:  # 1/3 is not: the folded merge rounds once per term, the steps once per step
            torch.testing.assert_close(got.read(name), ref.read(name), rtol=1e-6, atol=1e-7)
    assert "folded into one linear combination" in (out / "README.md").read_text()
    assert built["plan"].fold.linear_coefficients() is None  # a SLERP step: step by step


@pytest.mark.parametrize("operators", [["linear"], ["slerp", "linear"]])
def test_a_plan_with_an_extended_vocabulary_keeps_the_added_tokens(tmp_path: Path, operators: list[str]) -> None:
    """A plan over a chat fine-tune that added two tokens (embedding padded to 72 rows) and
    models of the base's 64-token vocabulary runs (folded, or step by step) with the union of
    the tokenizers. A linear plan merges the shared ids as without the added tokens, and each
    added token keeps the only row it has; a SLERP step's angle is over the whole tensor, added
    rows included (as mergekit's), so there the shared rows only come close."""
    from simmerge_ray.io.checkpoint import Checkpoint
    from simmerge_ray.planner.execute import execute_plan
    from simmerge_ray.probes.tokenize import load_tokenizer
    from vocab_fixtures import ADDED, extended_copy, with_tokenizer  # beside this file

    spec = SyntheticSpec(architecture="llama", hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                         vocab_size=64, dtype="float32")
    make_checkpoint(tmp_path / "base", spec)
    for i in range(3):
        make_checkpoint(tmp_path / f"m{i}", dataclasses.replace(spec, seed=i + 1), base=tmp_path / "base", delta_std=0.05)
    for m in ("base", "m0", "m1", "m2"):
        with_tokenizer(tmp_path / m)
    extended_copy(tmp_path / "m1", tmp_path / "ext", rows=72)
    models = ["m0", "ext", "m2"][:len(operators) + 1]
    catalog = Catalog.from_dict({"base": "base", "models": [{"name": m, "path": m} for m in models]}, root=tmp_path)
    plan = Plan("t", models, operators)
    assert all(cfg["tokenizer_source"] == "union" for cfg in plan.step_configs({m: tmp_path / m for m in models},
                                                                               tmp_path / "base"))
    results = execute_plan(plan, catalog, tmp_path / "out", ExecOptions(workers=1), out_dtype="float32")
    assert len(results) == len(operators)
    got = Checkpoint.open(tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out")
    assert got.config["vocab_size"] == 66 and [tok.convert_tokens_to_ids(t) for t in ADDED] == [64, 65]
    # the same plan over m1 itself (no added tokens) gives the shared rows, and ext gives the added ones
    plain = Catalog.from_dict({"base": "base", "models": [{"name": m, "path": "m1" if m == "ext" else m}
                                                          for m in models]}, root=tmp_path)
    execute_plan(plan, plain, tmp_path / "plain", ExecOptions(workers=1), out_dtype="float32")
    want = Checkpoint.open(tmp_path / "plain")
    ext = Checkpoint.open(tmp_path / "ext")
    exact = operators == ["linear"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shared, plain_rows = got.read(name)[:64], want.read(name)
        assert not torch.equal(shared, Checkpoint.open(tmp_path / "m0").read(name))
        torch.testing.assert_close(shared, plain_rows, rtol=1e-6 if exact else 0, atol=1e-7 if exact else 3e-3)
        if exact:  # the only model with the token: its row, whatever the weights
            torch.testing.assert_close(got.read(name)[64:], ext.read(name)[64:66], rtol=1e-6, atol=1e-7)
        else:  # the other side lacks the rows (zeros): ext's rows times the step's one coefficient
            added, own = got.read(name)[64:].double(), ext.read(name)[64:66].double()
            scale = added.norm(dim=1) / own.norm(dim=1)
            assert scale.min() > 0.1 and float(scale[0]) == pytest.approx(float(scale[1]), rel=1e-5)
            torch.testing.assert_close(added, float(scale[0]) * own, rtol=1e-5, atol=1e-7)
