"""The selector recovers a known operator rule; persistence; Ray Train and Ray Tune end to end."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch

from simmerge_ray.errors import ConfigError
from simmerge_ray.selector.data import build_pair_data
from simmerge_ray.selector.domain import training_domain
from simmerge_ray.selector.evaluate import (ablation, evaluate_loto, evaluate_pairs, evaluate_transfer, fixed_fit,
                                             gap_chart)
from simmerge_ray.selector.folds import group_kfold, leave_one_task_out, task_group_kfold
from simmerge_ray.selector.model import Selector, SelectorConfig, SelectorEnsemble, SelectorMLP
from simmerge_ray.selector.ray_fit import train_with_ray, tune_selector
from simmerge_ray.selector.train import fit_selector

OPS = ["linear", "slerp", "ties"]


def synthetic_tables(seed: int = 0, n_models: int = 16, tasks=("code", "math", "rag")) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Utilities are a known function of two structural features; one functional feature is noise."""
    rng = np.random.default_rng(seed)
    models = [f"m{i}" for i in range(n_models)]
    task_of = {m: tasks[i % len(tasks)] for i, m in enumerate(models)}
    lab, feat = [], []
    for a in models:
        for b in models:
            if a == b or task_of[a] == task_of[b]:
                continue
            x1, x2, noise = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.normal()
            t = task_of[a]
            util = {"linear": 0.5 - 0.6 * x1, "slerp": 0.5 + 0.6 * x2, "ties": 0.3 + 0.4 * x1 * x2}
            for op, u in util.items():
                lab.append({"task": t, "expert": a, "aux": b, "aux_task": task_of[b], "operator": op,
                            "utility": u + 0.02 * rng.normal()})
            feat.append({"a": a, "b": b, "task": t, "s_x1": x1, "s_x2": x2, "f_noise": noise})
    return pl.DataFrame(lab), pl.DataFrame(feat)


@pytest.fixture(scope="module")
def data():
    labels, features = synthetic_tables()
    return build_pair_data(labels, features)


def test_pair_data_shapes(data) -> None:
    assert data.operators == OPS
    assert data.feature_names == ["f_noise", "s_x1", "s_x2"]
    assert data.x.shape == (len(data), 3) and data.y.shape == (len(data), 3)
    sizes = (6, 5, 5)  # 16 models over 3 tasks
    assert len(data) == 16 * 15 - sum(s * (s - 1) for s in sizes)  # ordered cross-task pairs


def test_folds_never_split_a_pair(data) -> None:
    keys = np.asarray(data.pair_keys)
    for tr, te in group_kfold(data.pair_keys, 5, seed=1):
        assert not set(keys[tr]) & set(keys[te])
        assert len(tr) + len(te) == len(data)
    for task, (tr, te) in leave_one_task_out(data.tasks, data.aux_tasks).items():
        # every pair of the task as expert is tested; none with the task on either side is trained
        # on (a pair with it on the auxiliary side is a test pair's mirror: the same merge)
        assert list(te) == [i for i, t in enumerate(data.tasks) if t == task]
        assert task not in {data.tasks[i] for i in tr} | {data.aux_tasks[i] for i in tr}
        assert len(tr) == sum(task not in (t, u) for t, u in zip(data.tasks, data.aux_tasks)) > 0
    for tr, te in task_group_kfold(data.tasks, data.aux_tasks, 3, seed=1):
        held = {data.tasks[i] for i in te}
        assert not held & ({data.tasks[i] for i in tr} | {data.aux_tasks[i] for i in tr}) and len(tr) > 0
    with pytest.raises(ConfigError, match="leaves no pair without them on either side"):
        task_group_kfold(data.tasks, data.aux_tasks, 2, seed=1)  # a fold holding 2 of 3 tasks


def test_selector_recovers_known_rule(data) -> None:
    report = evaluate_pairs(data, fixed_fit(SelectorConfig(epochs=300, seed=0)), folds=5)
    chance = max(report["oracle_operator_share"].values())
    assert report["selection_accuracy"] > 0.8 > chance + 0.2
    assert report["utility"]["simmerge"]["mean"] > report["utility"][report["best_fixed_operator"]]["mean"] + 0.1
    assert report["simmerge_share_of_oracle"] > 0.9
    assert report["regret"]["simmerge"] < report["regret"]["majority"]
    loto = evaluate_loto(data, fixed_fit(SelectorConfig(epochs=300, task_encoding=False)))
    assert loto["selection_accuracy"] > 0.75


def test_ablation_structural_carries_the_signal(data) -> None:
    table = ablation(data, SelectorConfig(epochs=200), folds=4)
    assert set(table) == {"all features", "functional only", "structural only", "no task encoding"}
    assert table["structural only"]["selection_accuracy"] > table["functional only"]["selection_accuracy"] + 0.3


def test_save_load_round_trip_and_schema_check(data, tmp_path) -> None:
    sel = fit_selector(data, SelectorConfig(epochs=50))
    sel.save(tmp_path / "sel")
    again = Selector.load(tmp_path / "sel")
    np.testing.assert_array_equal(sel.predict(data.x, data.tasks), again.predict(data.x, data.tasks))
    np.testing.assert_array_equal(sel.encode(data.x, data.tasks), again.encode(data.x, data.tasks))
    assert again.operators == OPS and again.feature_names == data.feature_names
    with pytest.raises(ConfigError, match="lacks 1 of the selector's 3 features .*s_x2"):
        again.check_schema(["f_noise", "s_x1"], "features.parquet")
    with pytest.raises(ConfigError, match="selector expects 3 features"):
        again.predict(data.x[:, :2])
    x = data.x.copy()
    x[4, 1] = np.inf
    with pytest.raises(ConfigError, match=f"feature '{data.feature_names[1]}' is inf in row 4"):
        again.predict(x)
    with pytest.raises(ConfigError, match="not a selector folder"):
        Selector.load(tmp_path)


def test_an_ensemble_averages_members_trained_as_if_apart(data, tmp_path) -> None:
    """members=K: K networks from consecutive draws of the seed, each fitting the labels on its own,
    predictions averaged; the bandit's encoder is the members' predictions side by side and its
    prior head their mean per arm; saved and loaded whole. One member keeps the plain
    network (and its weights' names)."""
    single = fit_selector(data, SelectorConfig(epochs=40, dropout=0.0, seed=7))
    assert isinstance(single.net, SelectorMLP) and "body.0.weight" in single.net.state_dict()
    ens = fit_selector(data, SelectorConfig(epochs=40, dropout=0.0, seed=7, members=3))
    assert isinstance(ens.net, SelectorEnsemble) and len(ens.net.members) == 3
    x = ens.design(data.x, data.tasks)
    with torch.no_grad():
        members = torch.stack([m(x) for m in ens.net.members]).double().numpy()
        # the first member starts from the single network's weights and trains like it (Adam
        # scales each weight's step by its own gradient history: a member's share of the loss
        # changes nothing but Adam's epsilon), the others from later draws
        assert np.abs(members[0] - single.predict(data.x, data.tasks)).max() < 1e-4
        assert np.abs(members[1] - members[0]).max() > 1e-2
    np.testing.assert_allclose(ens.predict(data.x, data.tasks), members.mean(0), rtol=1e-6, atol=1e-6)
    z = ens.encode(data.x, data.tasks)
    assert z.shape == (len(data), 3 * len(OPS)) == (len(data), ens.width)  # the members' predictions
    head = ens.net.head
    via_head = z @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    np.testing.assert_allclose(via_head, ens.predict(data.x, data.tasks), rtol=1e-5, atol=1e-6)
    ens.save(tmp_path / "ens")
    again = Selector.load(tmp_path / "ens")
    assert again.config.members == 3
    np.testing.assert_array_equal(again.predict(data.x, data.tasks), ens.predict(data.x, data.tasks))
    with pytest.raises(ConfigError, match="members must be an integer >= 1, got 0"):
        SelectorConfig(members=0)


@pytest.mark.parametrize("members", [1, 3])
def test_bandit_head_prior_starts_from_the_selectors_prediction(data, members: int) -> None:
    """The selector's head on its encoding (an ensemble's: the mean of its members' predictions),
    as each arm's prior mean, reproduces `predict`; with the evidence-fitted variances the warm
    bandit's mean stays close to it."""
    from simmerge_ray.bandit.simulate import SimSettings, warm_bandit
    from simmerge_ray.selector.encoder import SelectorEncoder

    sel = fit_selector(data, SelectorConfig(epochs=50, task_encoding=False, members=members))
    enc = SelectorEncoder(sel)
    z = enc.encode(data.x)
    prior = enc.head_prior()
    fresh = np.stack([np.c_[z, np.ones(len(z))] @ prior[op] for op in sel.operators], axis=1)
    np.testing.assert_allclose(fresh, sel.predict(data.x), rtol=1e-5, atol=1e-6)
    bandit = warm_bandit(enc, sel.operators, z, data.y, SimSettings())
    assert all(a.prior_var < 1e-2 for a in bandit.arms)  # the evidence shrinks towards the head (5e-4 here)
    moved = np.abs(bandit.mean_scores(z) - sel.predict(data.x)).mean()
    # A bandit that ignored the selector (each arm's label mean) is 0.22 from it; this one about 0.01.
    ignored = np.abs(data.y.mean(axis=0) - sel.predict(data.x)).mean()
    assert moved < 0.25 * ignored


def test_gap_chart_written(data, tmp_path) -> None:
    report = evaluate_pairs(data, fixed_fit(SelectorConfig(epochs=30)), folds=3)
    png = gap_chart(report, tmp_path / "gap.png", "synthetic")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_ray_train_fits_several_selectors_in_one_run(ray_cluster, data, tmp_path) -> None:
    """One worker group trains each (data, config) in turn; with one worker each selector is the
    one a local fit of the same data and seed gives, weight for weight."""
    flipped = replace(data, y=data.y[:, ::-1].copy())  # another target on the same rows
    jobs = [(data, SelectorConfig(epochs=150, seed=3)), (flipped, SelectorConfig(epochs=60, seed=4, hidden=32)),
            (data, SelectorConfig(epochs=60, seed=5, hidden=32, members=3))]
    before = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    sels = train_with_ray(jobs, num_workers=1, storage=tmp_path)
    assert os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") == before  # set for the run only, a user's kept
    acc = np.mean(np.asarray(sels[0].choose(data.x, data.tasks)) == np.asarray([OPS[i] for i in data.y.argmax(1)]))
    assert acc > 0.8
    for sel, (d, cfg) in zip(sels, jobs):
        local = fit_selector(d, cfg)
        assert sel.config == cfg
        np.testing.assert_array_equal(sel.predict(d.x, d.tasks), local.predict(d.x, d.tasks))


def test_ray_tune_search(ray_cluster, data, tmp_path) -> None:
    best, trials = tune_selector(data, num_samples=4, folds=3, base=SelectorConfig(epochs=90), storage=tmp_path,
                                 chunk=25)
    assert len(trials) == 4 and {t["epochs"] for t in trials} == {90}  # the configured epochs, not 75 or 100
    assert all(np.isfinite(t["val_utility"]) for t in trials)
    assert best.hidden in (32, 64, 128) and best.depth in (1, 2, 3)
    assert max(t["val_utility"] for t in trials) > 0.5
    # Reproducible: the same data and seed give the same trials, stopped at the same epochs; an
    # ensemble's search runs on single networks, so it finds the same configuration for its members.
    again, trials_again = tune_selector(data, num_samples=4, folds=3, base=SelectorConfig(epochs=90, members=3),
                                       storage=tmp_path / "again", chunk=25)
    assert trials_again == trials and again == replace(best, members=3)


def test_held_out_evaluation_searches_each_fold_on_its_training_pairs_alone(ray_cluster, tmp_path) -> None:
    """`evaluate-selector` is nested: fold i's config is Ray Tune's pick on fold i's training pairs
    (a search that never saw its test pairs), and fold i's held-out predictions use that config."""
    from simmerge_ray.pipeline.selector import SelectorSettings, choose_config, evaluate

    # Four tasks: leaving one out leaves three, which task-grouped inner folds need (a fold trains
    # on the pairs with none of its held-out tasks on either side).
    labels, features = synthetic_tables(n_models=12, tasks=("code", "math", "rag", "chat"))
    labels.write_parquet(tmp_path / "labels.parquet")
    features.write_parquet(tmp_path / "features.parquet")
    s = SelectorSettings(tmp_path / "features.parquet", tmp_path / "labels.parquet", tmp_path / "eval",
                         tune_samples=2, epochs=50, calibration_folds=0)
    report = evaluate(s, folds=3, echo=lambda _: None)
    data = build_pair_data(labels, features)
    splits = group_kfold(data.pair_keys, 3, s.seed)
    cfgs = [SelectorConfig.from_dict(c) for c in report["fold_configs"]]
    assert len(cfgs) == 3 and report["config"] == report["fold_configs"][0]
    assert len(report["tune_trials"]) == 3 * 2
    # The last fold's config is the search on that fold's training pairs; on these tables it differs
    # from the first fold's, so a single search reused for every fold would fail here.
    alone, _ = choose_config(data.subset(splits[-1][0]), s, tmp_path / "search")
    assert alone == cfgs[-1] != cfgs[0]
    again = evaluate_pairs(data, [fixed_fit(c) for c in cfgs], folds=3, seed=s.seed)
    assert report["held_out_pairs"]["utility"] == again["utility"]
    # One config for every fold is the same evaluation as that config given once per fold.
    one = evaluate_pairs(data, fixed_fit(cfgs[0]), folds=3)
    assert one["utility"] == evaluate_pairs(data, [fixed_fit(cfgs[0])] * 3, folds=3)["utility"]
    with pytest.raises(ValueError, match="2 fit functions for 3 folds"):
        evaluate_pairs(data, [fixed_fit(cfgs[0])] * 2, folds=3)
    # Leave-one-task-out is nested too: each held-out task's config is the search on the other
    # tasks' pairs, its inner folds holding tasks out (it used to reuse the first fold's, which saw
    # every task), without task codes.
    from dataclasses import replace as replace_settings

    from simmerge_ray.selector.evaluate import evaluate_loto
    from simmerge_ray.selector.folds import leave_one_task_out

    loto = [SelectorConfig.from_dict(c) for c in report["leave_one_task_out_configs"]]
    tasks = leave_one_task_out(data.tasks, data.aux_tasks)
    assert len(loto) == len(tasks) > 1 and not any(c.task_encoding for c in loto)
    last_tr, _ = list(tasks.values())[-1]
    no_codes = replace_settings(s, task_encoding=False)
    alone, by_task = choose_config(data.subset(last_tr), no_codes, tmp_path / "loto", by_task=True)
    assert alone == loto[-1]
    # ... on inner folds that hold tasks out: the same sampled configs score otherwise on pair folds.
    _, by_pair = choose_config(data.subset(last_tr), no_codes, tmp_path / "loto-pairs")
    assert [t["lr"] for t in by_task] == [t["lr"] for t in by_pair]
    assert report["leave_one_task_out_trials"][-1] == by_task != by_pair
    assert report["leave_one_task_out"]["utility"] == evaluate_loto(data, [fixed_fit(c) for c in loto])["utility"]


def test_transfer_applies_a_selector_unchanged(data) -> None:
    """A selector fitted on one zoo, judged on another (here: a second draw of the same rule,
    with an extra feature column and one operator fewer) without retraining."""
    sel = fit_selector(data, SelectorConfig(epochs=300, seed=0))
    labels, features = synthetic_tables(seed=7, n_models=12)
    target = build_pair_data(labels, features.with_columns(s_extra=pl.lit(1.0)))
    report = evaluate_transfer(sel, target)
    assert report["n"] == len(target) and "majority" not in report["utility"]
    assert report["selection_accuracy"] > 0.8
    assert report["utility"]["simmerge"]["mean"] > report["utility"][report["best_fixed_operator"]]["mean"] + 0.1
    # Only the target's operators compete: the choice is the best predicted among linear and ties.
    two = build_pair_data(labels.filter(pl.col("operator") != "slerp"), features)
    sub = evaluate_transfer(sel, two)
    pred = sel.predict(two.x, two.tasks)[:, [0, 2]]
    chosen = two.y[np.arange(len(two)), pred.argmax(axis=1)]
    tasks = np.asarray(two.tasks)
    assert sub["utility"]["simmerge"]["mean"] == pytest.approx(
        np.mean([chosen[tasks == t].mean() for t in sorted(set(two.tasks))]))
    assert "outside_training_domain" not in report  # fitted without a recorded domain
    with pytest.raises(ConfigError, match="target feature table: lacks 1 of the selector's 3 features .*s_x2"):
        evaluate_transfer(sel, target.select_features(["f_noise", "s_x1"]))
    extra = labels.filter(pl.col("operator") == "linear").with_columns(operator=pl.lit("dare_linear"))
    with pytest.raises(ConfigError, match="target labels have operators the selector does not predict: dare_linear"):
        evaluate_transfer(sel, build_pair_data(labels.vstack(extra), features))
    # A column the target table holds but defines in no row (e.g. measured on the auxiliary's own
    # task where no auxiliary has one) is imputed, not refused: the predictions are those of a
    # target that carries the selector's training mean there.
    blank = build_pair_data(labels, features.with_columns(pl.lit(None, dtype=pl.Float64).alias("s_x2")))
    assert "s_x2" not in blank.feature_names and blank.undefined_features == ("s_x2",)
    at_mean = build_pair_data(labels, features.with_columns(pl.lit(float(sel.mean[sel.feature_names.index("s_x2")]))
                                                            .alias("s_x2")))
    assert evaluate_transfer(sel, blank)["utility"] == evaluate_transfer(sel, at_mean)["utility"]


def test_transfer_counts_target_pairs_outside_the_training_domain(data) -> None:
    """A target drawn like the training rows stays (almost) inside the domain; the same target with
    one feature moved far beyond the training range is flagged on every row, naming that feature."""
    sel = fit_selector(data, SelectorConfig(epochs=100, seed=0))
    sel.domain = training_domain(sel.standardise(data.x), sel.feature_names, data.same_task_pairs)
    labels, features = synthetic_tables(seed=7, n_models=12)
    target = build_pair_data(labels, features)
    inside = evaluate_transfer(sel, target)["outside_training_domain"]
    assert inside["rows"] == len(target) and inside["share"] <= 0.05
    assert inside["threshold"] == pytest.approx(sel.domain.max_abs_z)
    shifted = build_pair_data(labels, features.with_columns(s_x2=pl.col("s_x2") + 100.0))
    far = evaluate_transfer(sel, shifted)["outside_training_domain"]
    assert far["outside"] == far["rows"] == len(shifted) and far["share"] == 1.0
    assert far["most_extreme_feature"] == {"s_x2": len(shifted)}
