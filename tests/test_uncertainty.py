"""Intervals, out-of-distribution flags and the expert-alone comparison (issue 18, item 4):
the conformal math on known residuals, the measured coverage, flags on a same-task pair and on an
extreme row, `simmerge plan` with a selector of known outputs, and an older selector folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as simmerge
from simmerge_ray.planner.assess import expert_alone, input_flags
from simmerge_ray.planner.propagate import GramTable
from simmerge_ray.planner.request import PlanRequest, plan_request
from simmerge_ray.planner.objective import Objective
from simmerge_ray.planner.step_model import SelectorStepModel
from benchmarks.synthetic_world import build_world
from simmerge_ray.selector.calibration import LEVELS, Calibration, calibrate, conformal_quantile, coverage
from simmerge_ray.selector.data import EXPERT_ALONE, build_pair_data
from simmerge_ray.selector.domain import training_domain
from simmerge_ray.selector.evaluate import evaluate_pairs, fixed_fit
from simmerge_ray.selector.model import Selector, SelectorConfig
from simmerge_ray.testbed.label_tables import gap_closed, two_sided_utility


def test_conformal_quantile_on_known_residuals() -> None:
    r = np.array([7, 3, 10, 1, 9, 2, 8, 4, 6, 5], dtype=float)  # 1..10 shuffled, n = 10
    assert conformal_quantile(r, 0.8) == 9.0  # rank ceil(11 x 0.8) = 9
    assert conformal_quantile(r, 0.9) == 10.0  # rank ceil(11 x 0.9) = 10
    assert conformal_quantile(np.append(r, np.nan), 0.9) == 10.0  # undefined residuals are ignored
    assert conformal_quantile(np.arange(1.0, 10.0), 0.9) == 9.0  # (9 + 1) x 0.9 is rank 9, not 10
    assert math.isinf(conformal_quantile(np.arange(1.0, 5.0), 0.9))  # rank 5 of 4: unbounded
    y = np.column_stack([np.zeros(10), np.zeros(10)])
    pred = np.column_stack([r / 10, -2 * r / 10])
    cal = calibrate(y, pred, ["a", "b"], folds=5)
    np.testing.assert_allclose(cal.halfwidth, [[0.9, 1.8], [1.0, 2.0]])
    lo, hi = cal.intervals(np.array([[0.5, 0.5]]))["80"]
    np.testing.assert_allclose([lo[0], hi[0]], [[-0.4, -1.3], [1.4, 2.3]])
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())), ["b", "a"], "selector.json")
    np.testing.assert_allclose(again.halfwidth, cal.halfwidth[:, ::-1])
    # Coverage: a 0.5 half-width covers residuals 0.1..0.5 of 1..10 tenths, the argmax arm is arm a.
    hw = np.full((10, len(LEVELS), 2), 0.5)
    cov = coverage(y, pred, hw)
    assert cov["80"] == {"nominal": 0.8, "all_arms": pytest.approx(7 / 20), "picked_arm": 0.5, "mean_width": 1.0}


def test_expert_alone_values_follow_the_label_definitions() -> None:
    s_e, s_a, s_ea, s_aa = 0.6, 0.2, 0.1, 0.5  # expert and aux on the expert's task, then on the aux's
    expert_side = gap_closed(s_e, s_e, s_a)  # the merge is the expert: s_merge = s_e on the expert's task
    aux_side = gap_closed(s_ea, s_aa, s_ea)  # label_tables' aux side: (s_merge - s_ea) / (s_aa - s_ea)
    assert (expert_side, aux_side) == (1.0, 0.0)
    assert EXPERT_ALONE == {"utility": two_sided_utility(expert_side, aux_side), "gap_closed": expert_side,
                            "aux_gap_closed": aux_side}


@pytest.fixture(scope="module")
def small_selector() -> Selector:
    """A 1-layer selector over three features whose outputs are the head bias (weights zero)."""
    rng = np.random.default_rng(0)
    feats = pl.DataFrame({"a": [f"m{i}" for i in range(40)], "b": [f"n{i}" for i in range(40)], "task": "code",
                          "s_x": rng.normal(size=40), "s_y": rng.normal(size=40), "f_z": rng.normal(size=40)})
    labels = pl.DataFrame([{"task": "code", "expert": a, "aux": b, "aux_task": "math", "operator": op, "utility": 0.0}
                           for a, b in zip(feats["a"], feats["b"]) for op in ("linear", "slerp", "ties")])
    data = build_pair_data(labels, feats)
    sel = fixed_fit(SelectorConfig(hidden=4, depth=1, epochs=1))(data)
    return known_outputs(sel, data, [0.2, 0.3, 0.1])


def known_outputs(sel: Selector, data, bias: list[float]) -> Selector:
    """Set every prediction to `bias`; calibrate half-widths 0.1/0.2/0.3 (80%) and 0.15/0.25/unbounded
    (90%); record the domain of `data` (no same-task pair)."""
    with torch.no_grad():
        for p in sel.net.parameters():
            p.zero_()
        sel.net.head.bias.copy_(torch.tensor(bias))
    sel.meta = {"target": "utility"}
    sel.calibration = Calibration(list(sel.operators), LEVELS, np.array([[0.1, 0.2, 0.3], [0.15, 0.25, np.inf]]),
                                  rows=40, folds=5)
    sel.domain = training_domain(sel.standardise(data.x), sel.feature_names, data.same_task_pairs)
    return sel


def test_domain_flags_an_extreme_row_and_round_trips(small_selector: Selector, tmp_path: Path) -> None:
    dom = small_selector.domain
    assert dom.same_task_pairs is False and dom.rows == 40 and 1.5 < dom.max_abs_z < 4
    assert dom.outlier(np.zeros(3)) is None and dom.outlier(np.array([np.nan, np.nan, np.nan])) is None
    out = dom.outlier(np.array([0.5, np.nan, -dom.max_abs_z - 1]))
    assert out is not None and out["feature"] == "s_y" and out["z"] == pytest.approx(-dom.max_abs_z - 1)
    small_selector.save(tmp_path / "sel")
    again = Selector.load(tmp_path / "sel")
    assert again.domain.max_abs_z == dom.max_abs_z and again.domain.same_task_pairs is False
    np.testing.assert_array_equal(again.calibration.halfwidth, small_selector.calibration.halfwidth)


def test_same_task_flags_follow_tasks_not_positions(small_selector: Selector) -> None:
    tasks = {"code-1": "code", "code-2": "code", "math-1": "math", "rag-1": "rag"}
    z = np.zeros((2, 3))
    # the expert last: every step joins models of distinct tasks, nothing to flag
    assert input_flags(small_selector, z, ["math-1", "rag-1", "code-1"], tasks, "code", "code-1") == []
    # two code experts in one plan, the second joining at step 2: flagged there, naming the first
    flags = input_flags(small_selector, z, ["code-1", "math-1", "code-2"], tasks, "code", "code-1")
    assert [(f["kind"], f["step"], f["shares_task_with"]) for f in flags] == [("same_task", 2, ["code-1"])]
    # an expert the catalog gives no task still counts as one of the target task
    untagged = {**tasks, "mine": None}
    flags = input_flags(small_selector, z, ["mine", "math-1", "code-1"], untagged, "code", "mine")
    assert [(f["step"], f["shares_task_with"]) for f in flags] == [(2, ["mine"])]
    assert "code-1 is a code expert and mine is this plan's code expert;" in flags[0]["message"]  # not "like mine"
    # an expert the catalog gives another task is said to be planned for this one
    flags = input_flags(small_selector, z[:1], ["math-1", "rag-1"], tasks, "code", "math-1")
    assert [(f["kind"], f["model"], f["task"]) for f in flags] == [("expert_task", "math-1", "math")]
    assert flags[0]["message"] == "math-1 is the catalog's math expert but is planned as the code expert: its gap is judged on code"


def test_expert_alone_for_multiway_objectives(small_selector: Selector) -> None:
    # Not merging keeps the expert's whole gap (R = 1) and none of the other models' own gaps.
    obj = Objective(retention_weight=2.0, aux_weight=1.0)
    ea = expert_alone(small_selector, obj, 1.5)
    assert ea == {"available": True, "target": "retention", "value": 2.0, "best": 1.5, "better": True,
                  "margin": pytest.approx(0.5)}
    assert not expert_alone(small_selector, obj, 2.5)["better"]
    # a utility selector without its auxiliary twin: R of the expert is U, which is 0.5 alone
    assert expert_alone(small_selector, obj, 0.9, proxy=True)["value"] == 1.0
    # pairwise plans: the selector's own target for the expert alone (utility: 0.5)
    assert expert_alone(small_selector, None, 0.6)["value"] == 0.5


def test_coverage_is_measured_on_held_out_pairs() -> None:
    rng = np.random.default_rng(1)
    n = 60
    feats = pl.DataFrame({"a": [f"m{i}" for i in range(n)], "b": [f"n{i}" for i in range(n)], "task": "code",
                          "s_x": rng.normal(size=n)})
    labels = pl.DataFrame([{"task": "code", "expert": a, "aux": b, "operator": op,
                            "utility": 0.5 + 0.3 * x * (op == "ties") + 0.1 * rng.normal()}
                           for a, b, x in zip(feats["a"], feats["b"], feats["s_x"]) for op in ("linear", "ties")])
    rep = evaluate_pairs(build_pair_data(labels, feats), fixed_fit(SelectorConfig(hidden=8, depth=1, epochs=40)),
                         folds=3, calibration_folds=3)
    cov = rep["intervals"]
    assert (cov["rows"], cov["arms"]) == (n, 2) and set(cov["levels"]) == {"80", "90"}
    for key, c in cov["levels"].items():
        assert abs(c["all_arms"] - c["nominal"]) <= 0.15, (key, c)
    assert cov["levels"]["90"]["mean_width"] > cov["levels"]["80"]["mean_width"] > 0


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """The planning world with two code experts (code-0, code-1); its selector is an older folder
    (no calibration, no domain, no target)."""
    return build_world(tmp_path_factory.mktemp("uncertainty"), n_models=5, epochs=5)


def _plan(w, selector: Path, out: Path, *extra: str) -> int:
    return simmerge(["plan", "--selector", str(selector), "--catalog", str(w.catalog), "--features", str(w.features),
                     "--task", "code", "--out", str(out), *extra])


def test_plan_flags_a_same_task_pair_and_an_extreme_row(world, small_selector: Selector, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    feats = pl.read_parquet(world.features / "features.parquet")
    rows = feats.filter(pl.col("a").str.starts_with("code") & (pl.col("task") == "code"))
    data = build_pair_data(pl.DataFrame([{"task": "code", "expert": a, "aux": b, "aux_task": b.split("-")[0],
                                          "operator": op, "utility": 0.0} for a, b in zip(rows["a"], rows["b"])
                                         if not b.startswith("code") for op in ("linear", "slerp", "ties")]), feats)
    sel = known_outputs(fixed_fit(SelectorConfig(hidden=4, depth=1, epochs=1))(data), data, [0.2, 0.3, 0.1])
    sel.save(tmp_path / "sel")
    # An extreme value of one feature for the same-task pair, in a copy of the features folder.
    fdir = tmp_path / "feats"
    shutil.copytree(world.features, fdir)
    j = sel.feature_names.index("f_kl_ab_mean")
    far = sel.mean[j] + 50 * sel.scale[j]
    feats.with_columns(pl.when((pl.col("a") == "code-0") & (pl.col("b") == "code-1")).then(far)
                       .otherwise(pl.col("f_kl_ab_mean")).alias("f_kl_ab_mean")).write_parquet(fdir / "features.parquet")
    w = world.__class__(world.catalog, fdir, world.selector, world.models, world.tasks)
    assert _plan(w, tmp_path / "sel", tmp_path / "pair", "--expert", "code-0", "--aux", "code-1") == 0
    out, err = capsys.readouterr()
    assert "code-0 + code-1 on code: choose slerp" in out
    assert "slerp  predicted utility   30.0%  80%: [  10.0%,   50.0%]  90%: [   5.0%,   55.0%]" in out
    assert "ties   predicted utility   10.0%  80%: [ -20.0%,   40.0%]  90%: unbounded" in out
    assert ("not merging is predicted better: keeping code-0 alone (not merging) scores 50.0% utility; the best arm, "
            "slerp, is predicted 30.0%, 20.0 points lower") in out
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("simmerge plan: warning: code-0 + code-1: ") for w in warnings)
    assert "code-1 is a code expert like code-0" in warnings[0]
    assert "input outside the training rows: f_kl_ab_mean at z = +50.0" in warnings[1]
    plan = json.loads((tmp_path / "pair" / "plan.json").read_text())
    assert [f["kind"] for f in plan["flags"]] == ["same_task", "out_of_range"]
    assert plan["flags"][1]["feature"] == "f_kl_ab_mean" and plan["flags"][1]["z"] == pytest.approx(50.0)
    assert plan["expert_alone"] == {"available": True, "target": "utility", "value": 0.5,
                                    "best": pytest.approx(0.3), "better": True, "margin": pytest.approx(0.2)}
    assert plan["arms"][0]["operator"] == "slerp" and plan["arms"][0]["interval"]["80"] == pytest.approx([0.1, 0.5])
    assert plan["intervals"]["levels"]["90"]["score"] == pytest.approx([0.05, 0.55])

    # Multi-way: every 3-way plan of code-0, code-1, math-0 chains the two code experts; each
    # step's input is checked, and the score's bound is the objective at the step bounds.
    model = SelectorStepModel(sel, GramTable.load(world.features), feats)
    req = PlanRequest.parse({"request_id": "x", "task": "code", "models": ["code-0", "code-1", "math-0"],
                             "min_way": 3, "max_way": 3, "required_expert": "code-0"})
    best = plan_request(req, Catalog.load(world.catalog), model).best
    same = [f for f in best.flags if f["kind"] == "same_task"]
    assert [(f["step"], f["model"]) for f in same] == [(best.models.index("code-1"), "code-1")]
    assert best.operators == ["slerp", "slerp"] and best.score == pytest.approx(0.09)
    assert best.intervals["levels"]["80"]["score"] == pytest.approx([0.01, 0.25])  # (0.3 -+ 0.2)^2
    # without the auxiliary selector the expert's R is the two-sided utility U: alone, U = 0.5
    assert best.expert_alone["value"] == 0.5 and best.expert_alone["better"]
    assert best.expert_alone["target"] == "retention (two-sided utility proxy)"


def test_a_required_expert_of_another_task_is_judged_on_the_plan_task(world) -> None:
    """`--task code --required-expert math-0`: the plan keeps math-0's gap on code, as the README
    and its expert_task flag say (its retention was predicted on math, its catalog task)."""
    from simmerge_ray.planner.request import search_space

    req = PlanRequest.parse({"request_id": "x", "task": "code", "models": ["math-0", "code-1", "rag-0"],
                             "min_way": 2, "max_way": 3, "required_expert": "math-0"})
    space = search_space(req, Catalog.load(world.catalog))
    assert space.experts == ["math-0"]
    assert space.tasks == {"math-0": "code", "code-1": "code", "rag-0": "rag"}
    # ... and the plan still says so (its flags read the catalog's tasks)
    from simmerge_ray.planner.request import build_step_model

    best = plan_request(req, Catalog.load(world.catalog), build_step_model(world.selector, world.features)).best
    (flag,) = [f for f in best.flags if f["kind"] == "expert_task"]
    assert flag["model"] == "math-0" and "planned as the code expert: its gap is judged on code" in flag["message"]


def test_a_joining_model_without_a_task_is_scored_on_the_proxy_not_2u_minus_v(world, tmp_path: Path) -> None:
    """2 U - V needs V, the auxiliary side's GapClosed, which a model without a task does not
    have (and no label measured): for it the merge side is U, the proxy. It used to be 2 U - V
    with a V made up from imputed inputs (an expert kept 0.486 of its gap without the auxiliary
    selector and 0.850 with it, whatever the auxiliary weight)."""
    feats = pl.read_parquet(world.features / "features.parquet")
    rows = feats.filter(pl.col("a").str.starts_with("code") & ~pl.col("b").str.starts_with("code")
                        & (pl.col("task") == "code"))
    data = build_pair_data(pl.DataFrame([{"task": "code", "expert": a, "aux": b, "aux_task": b.split("-")[0],
                                          "operator": op, "utility": 0.0} for a, b in zip(rows["a"], rows["b"])
                                         for op in ("linear", "slerp", "ties")]), feats)
    fit = fixed_fit(SelectorConfig(hidden=4, depth=1, epochs=1))
    u_sel = known_outputs(fit(data), data, [0.2, 0.3, 0.1])
    v_sel = known_outputs(fit(data), data, [0.5, 0.6, 0.7])
    v_sel.meta = {"target": "aux_gap_closed"}
    model = SelectorStepModel(u_sel, GramTable.load(world.features), feats, v_sel)
    assert model.two_sided
    start = model.start("code-0")
    u, v = model.step_utilities([start, start], ["math-0", "rag-0"], "code", joining_tasks=["math", None])
    np.testing.assert_allclose(u, [[-0.1, 0.0, -0.5], [0.2, 0.3, 0.1]], atol=1e-6)
    np.testing.assert_allclose(v, [[0.5, 0.6, 0.7]] * 2, atol=1e-6)
    both, _ = model.step_utilities([start, start], ["math-0", "rag-0"], "code")  # no tasks given: every one has one
    np.testing.assert_allclose(both, [[-0.1, 0.0, -0.5]] * 2, atol=1e-6)
    # The search passes each joining model's task from the catalog.
    from simmerge_ray.planner.search import Replayer
    tasks = {"code-0": "code", "math-0": "math", "rag-0": None}
    (tagged,) = Replayer(model, "code", tasks).replay(["code-0", "math-0"], ["slerp"], None)
    (untagged,) = Replayer(model, "code", tasks).replay(["code-0", "rag-0"], ["slerp"], None)
    assert tagged.kept["code"] == pytest.approx(0.0, abs=1e-6) and tagged.joining == pytest.approx(0.6)
    assert untagged.kept["code"] == pytest.approx(0.3) and untagged.joining == pytest.approx(0.6)


def test_a_pairwise_plan_names_the_inputs_it_imputed(world, tmp_path: Path, capsys) -> None:
    """An undefined (null) feature of the pair is imputed, and the plan says so instead of silently."""
    fdir = tmp_path / "feats"
    shutil.copytree(world.features, fdir)
    feats = pl.read_parquet(fdir / "features.parquet")
    pair = (pl.col("a") == "code-0") & (pl.col("b") == "math-0")
    feats.with_columns(pl.when(pair).then(None).otherwise(pl.col("f_kl_ab_mean")).alias("f_kl_ab_mean")) \
        .write_parquet(fdir / "features.parquet")
    w = world.__class__(world.catalog, fdir, world.selector, world.models, world.tasks)
    assert _plan(w, world.selector, tmp_path / "pair", "--expert", "code-0", "--aux", "math-0") == 0
    err = capsys.readouterr().err
    assert ("simmerge plan: warning: code-0 + math-0: 1 input(s) undefined for this pair (imputed with the "
            "selector's training mean): f_kl_ab_mean") in err
    flags = json.loads((tmp_path / "pair" / "plan.json").read_text())["flags"]
    assert [f["features"] for f in flags if f["kind"] == "imputed"] == [["f_kl_ab_mean"]]


def test_a_multiway_plan_says_which_retentions_it_does_not_count(world, tmp_path: Path, capsys) -> None:
    """A joining model's retention is not predicted without an auxiliary selector, nor ever for a
    model without a task; the plan line names each and why, instead of leaving it out silently."""
    import yaml

    raw = yaml.safe_load(world.catalog.read_text())
    raw["base"] = str(world.catalog.parent / raw["base"]) if raw.get("base") else None
    for m in raw["models"]:
        m["path"] = str(world.catalog.parent / m["path"])
        if m["name"] == "chat-0":
            del m["task"]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    w = world.__class__(tmp_path / "catalog.yaml", world.features, world.selector, world.models, world.tasks)
    assert _plan(w, world.selector, tmp_path / "multi", "--models", "code-0", "math-0", "chat-0",
                 "--min-way", "3", "--max-way", "3") == 0
    first = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("1. score"))
    kept, _, unscored = first.partition("predicted share of each model's gap kept: ")[2].partition("; ")
    assert kept.startswith("code-0 ") and "," not in kept, first
    assert unscored.startswith("not predicted, so not counted: ") and unscored.endswith(")"), first
    assert set(unscored[len("not predicted, so not counted: "):-1].split(", ")) == {
        "math-0 (no auxiliary selector)", "chat-0 (no task)"}, first


def test_an_older_selector_folder_plans_without_intervals(world, tmp_path: Path, capsys) -> None:
    old = json.loads((world.selector / "selector.json").read_text())
    assert "calibration" not in old and "domain" not in old
    sel = Selector.load(world.selector)
    assert sel.calibration is None and sel.domain is None
    assert _plan(world, world.selector, tmp_path / "pair", "--expert", "code-0", "--aux", "math-0") == 0
    out, err = capsys.readouterr()
    assert "intervals unavailable: the selector has no interval calibration" in out
    assert "not merging: not compared (the selector records no target" in out
    assert "out-of-distribution checks skipped" in err
    plan = json.loads((tmp_path / "pair" / "plan.json").read_text())
    assert plan["intervals"]["available"] is False and plan["arms"][0]["interval"] == {}
    assert [f["kind"] for f in plan["flags"]] == ["unchecked"]


def test_plan_refuses_features_measured_from_another_checkpoint(world, tmp_path: Path, capsys) -> None:
    """A catalog whose model name now points at another checkpoint (a retrained expert, an
    edited path) must not be planned from the features of the old one; a byte-identical copy of
    the measured checkpoint elsewhere is the same model."""
    raw = yaml.safe_load(world.catalog.read_text())
    root = world.catalog.parent
    entry = next(m for m in raw["models"] if m["name"] == "math-0")
    other = next(m for m in raw["models"] if m["name"] == "code-1")
    copy = tmp_path / "math-0-copy"
    shutil.copytree(root / entry["path"], copy)
    for name, path in (("stale", root / other["path"]), ("copy", copy)):
        cat = {**raw, "base": str(root / raw["base"]) if raw.get("base") else None,
               "models": [{**m, "path": str(path if m["name"] == "math-0" else root / m["path"])} for m in raw["models"]],
               "tasks": {t: {k: str(root / v) for k, v in spec.items()} for t, spec in raw["tasks"].items()}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({k: v for k, v in cat.items() if v is not None}))
        w = world.__class__(tmp_path / f"{name}.yaml", world.features, world.selector, world.models, world.tasks)
        for args in (("--expert", "code-0", "--aux", "math-0"), ("--models", "code-0", "math-0", "--min-way", "2")):
            rc = _plan(w, world.selector, tmp_path / f"{name}-{args[0][2:]}", *args)
            err = capsys.readouterr().err
            if name == "copy":
                assert rc == 0, err
                continue
            assert rc == 2 and not (tmp_path / f"{name}-{args[0][2:]}").exists()
            assert (f"simmerge plan: error: {world.features / 'gram_meta.json'}: model 'math-0' ({root / other['path']}) "
                    f"is not the checkpoint its features describe (they were measured from {root / entry['path']})") in err
    # The base too: the structural features' task vectors were measured against the catalog's base.
    from safetensors.torch import load_file, save_file

    rebased = shutil.copytree(root / raw["base"], tmp_path / "base2")
    shard = sorted(rebased.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 0.01}, shard, metadata={"format": "pt"})  # another base, same shapes
    cat = {**raw, "base": str(rebased),
           "models": [{**m, "path": str(root / m["path"])} for m in raw["models"]],
           "tasks": {t: {k: str(root / v) for k, v in spec.items()} for t, spec in raw["tasks"].items()}}
    (tmp_path / "rebased.yaml").write_text(yaml.safe_dump(cat))
    w = world.__class__(tmp_path / "rebased.yaml", world.features, world.selector, world.models, world.tasks)
    assert _plan(w, world.selector, tmp_path / "rebased", "--expert", "code-0", "--aux", "math-0") == 2
    assert (f"simmerge plan: error: {world.features / 'gram_meta.json'}: the catalog's base ({rebased}) "
            f"is not the checkpoint the structural features measured task vectors against") in capsys.readouterr().err


def test_labels_from_other_checkpoints_than_the_features_are_refused(world, tmp_path: Path, capsys) -> None:
    """fit, evaluate-selector and bandit-init trained on labels and features measured from
    different checkpoints of a model name (or of the base) without a word: labels recorded none."""
    from benchmarks.synthetic_world import synthetic_labels
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.selector.data import load_pair_data

    meta = json.loads((world.features / "gram_meta.json").read_text())
    labels = tmp_path / "labels" / "labels.parquet"
    labels.parent.mkdir()
    synthetic_labels(pl.read_parquet(world.features / "features.parquet"), Catalog.load(world.catalog),
                     np.random.default_rng(0)).write_parquet(labels)
    labelled = {name: meta["fingerprints"][name] for name in world.models} | {"base": meta["fingerprints"][meta["base"]]}
    summary = labels.parent / "label_summary.json"
    for checkpoints in (None, labelled):  # labels of an older version record none: not checked
        summary.write_text(json.dumps({"checkpoints": checkpoints}))
        assert len(load_pair_data(world.features, labels)) > 0
    model = world.models[1]
    summary.write_text(json.dumps({"checkpoints": {**labelled, model: "retrained"}}))
    assert simmerge(["bandit-init", "--state", str(tmp_path / "state"), "--features", str(world.features),
                     "--labels", str(labels)]) == 2 and not (tmp_path / "state").exists()
    assert f"model {model!r} was labelled from another checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError) as caught:
        load_pair_data(world.features, labels)
    assert str(caught.value) == (f"{labels}: model {model!r} was labelled from another checkpoint than the one "
                                 f"{world.features / 'gram_meta.json'} records; run `simmerge label` or the feature "
                                 f"stages again, so both describe one catalog")
    linked = tmp_path / "elsewhere" / "features.parquet"  # the records lie beside the link's target
    linked.parent.mkdir()
    linked.symlink_to(world.features / "features.parquet")
    with pytest.raises(ConfigError, match=f"model {model!r} was labelled from another checkpoint"):
        load_pair_data(linked, labels)
    summary.write_text(json.dumps({"checkpoints": {**labelled, "base": "another"}}))
    with pytest.raises(ConfigError, match="labelled against another base than the one .*gram_meta.json records"):
        load_pair_data(world.features / "features.parquet", labels)
