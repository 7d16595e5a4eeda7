"""The multi-way judge on a hand-made label table: what each method's entry averages over."""

from __future__ import annotations

import itertools
import json

import numpy as np
import polars as pl
import pytest

from simmerge_ray.merge.arms import STEP_ARMS, WEIGHTING_NAMES
from simmerge_ray.planner.evaluate import JUDGED, evaluate_multiway

TASKS = {"a": "x", "b": "y", "c": "z", "d": "x", "e": "y", "f": "z", "g": "x", "h": "y", "i": "z"}


def retention(models: tuple, ops: tuple, weighting: str) -> dict[str, float]:
    """A made-up ground truth: the last model keeps most, ties helps, 'anchor' favours the first."""
    out = {}
    for pos, m in enumerate(models):
        r = -0.9 + 0.3 * pos + 0.05 * ops.count("ties")
        if weighting == "anchor" and pos == 0:
            r += 0.5
        out[m] = r + 0.01 * (ord(m) - ord("a"))
    return out


def labels(subsets: tuple[str, ...] = ("abc",), truth=retention) -> pl.DataFrame:
    rows = []
    for order in itertools.chain.from_iterable(itertools.permutations(s) for s in subsets):
        for w in WEIGHTING_NAMES:
            for ops in [(op, op) for op in STEP_ARMS] + [("linear", "ties")]:
                kept = truth(order, ops, w)
                rows.append({"models": list(order), "operators": list(ops), "weighting": w, "k": 3,
                             "retention": json.dumps(kept)})
    return pl.DataFrame(rows)


class Oracle:
    """A scorer that predicts the measured objective exactly (duck-typed PlanScorer)."""

    objective = JUDGED
    tasks = TASKS

    sign = 1.0

    def retentions_many(self, plans, expert) -> list[dict[str, float]]:
        # predicted R = 1 + measured retention (negated: every score negated, the objective being linear)
        return [{m: self.sign * (1 + r) for m, r in retention(tuple(m), tuple(o), w).items()} for m, o, w in plans]


class Backwards(Oracle):
    sign = -1.0


def test_a_perfect_scorer_is_the_oracle_and_baselines_are_expectations() -> None:
    table = labels()
    res = evaluate_multiway(table, Oracle())["3way"]
    assert res["subsets"] == 1 and res["targets"] == 3
    assert res["simmerge"] == res["oracle"]
    # the best plan for each target: that model last (0.3 x 2), anchor cannot beat it
    for expert in "abc":
        assert res["by_task"][TASKS[expert]]["simmerge"]["expert_retention"] == pytest.approx(
            -0.9 + 0.6 + 0.1 + 0.01 * "abc".index(expert))
    # random order keeps the pick's weighting and arms and averages over the 6 orders
    pick_ops, pick_w = ("ties", "ties"), "anchor"
    rand = [retention(o, pick_ops, pick_w) for o in itertools.permutations("abc")]
    want = np.mean([np.mean(list(r.values())) for r in rand])
    assert res["random_order"]["mean_retention"] == pytest.approx(want)
    # a fixed arm: every order and weighting with that arm at both steps
    lin = [retention(o, ("linear", "linear"), w) for o in itertools.permutations("abc") for w in WEIGHTING_NAMES]
    assert res["linear"]["mean_retention"] == pytest.approx(np.mean([np.mean(list(r.values())) for r in lin]))
    soup = [retention(o, ("linear", "linear"), "equal") for o in itertools.permutations("abc")]
    assert res["equal_share"]["mean_retention"] == pytest.approx(np.mean([np.mean(list(r.values())) for r in soup]))
    assert res["learned_minus_random_order"]["x"]["mean_retention"] == pytest.approx(
        res["by_task"]["x"]["simmerge"]["mean_retention"] - res["by_task"]["x"]["random_order"]["mean_retention"])
    # what order alone buys: the pick over its rule in a random order, and that rule's best order
    assert res["best_order"]["mean_retention"] == pytest.approx(max(np.mean(list(r.values())) for r in rand))
    gain = res["order_gain"]
    assert gain["simmerge"]["measured"] == pytest.approx(res["simmerge"]["mean_retention"] - want)
    assert gain["simmerge"]["ceiling"] == pytest.approx(res["best_order"]["mean_retention"] - want)
    assert gain["simmerge"]["ceiling"] == pytest.approx(0.0)  # this truth's mean ignores the order
    assert gain["oracle"] == {"measured": pytest.approx(gain["simmerge"]["measured"])}  # the perfect scorer is the oracle


def fragile_a(models: tuple, ops: tuple, weighting: str) -> dict[str, float]:
    """The same truth, but model a keeps 0.3 less unless it joins last: the order moves the mean."""
    out = retention(models, ops, weighting)
    if models[-1] != "a":
        out["a"] -= 0.3
    return out


def test_order_gain_is_bounded_by_the_rules_best_order() -> None:
    res = evaluate_multiway(labels(truth=fragile_a), Backwards())["3way"]
    gain = res["order_gain"]["simmerge"]
    # a perfect orderer of any rule puts a last; a random order does not 2 times in 3 and then
    # loses 0.3 / 3 of the mean: the ceiling is 0.1 x 2/3 above random
    assert gain["ceiling"] == pytest.approx(0.2 / 3)
    assert gain["measured"] < 0 < gain["ceiling"]
    assert res["best_order"]["mean_retention"] > res["random_order"]["mean_retention"] > res["simmerge"]["mean_retention"]


def test_a_backwards_scorer_picks_the_worst_plan() -> None:
    res = evaluate_multiway(labels(), Backwards())["3way"]
    # it puts the expert first without the anchor's bonus; random order averages its positions
    assert res["simmerge"]["expert_retention"] < res["random_order"]["expert_retention"] < res["oracle"]["expert_retention"]
    assert res["simmerge"]["mean_retention"] < res["oracle"]["mean_retention"]


def test_objective_scores_retention_from_step_predictions() -> None:
    from simmerge_ray.planner.objective import Objective, StepPrediction

    tasks = {"e": "x", "a": "y", "b": "z"}
    steps = [StepPrediction("a", 0.5, {"x": 0.8}, 0.6), StepPrediction("b", 0.5, {"x": 0.5, "y": 0.9}, 2.0)]
    obj = Objective(retention_weight=1.0, aux_weight=1.0)
    r = obj.retention("e", steps, tasks)
    # e: 0.8 x 0.5; a: joins keeping 0.6, then 0.9; b: joins keeping 2.0, clipped to 1.5
    assert r == pytest.approx({"e": 0.4, "a": 0.54, "b": 1.5})
    assert obj.score(r, "e") == pytest.approx(0.4 + (0.54 + 1.5) / 2)
    # the expert joining last without an auxiliary prediction: nothing says what it keeps
    blind = [StepPrediction("a", 0.5, {"y": 0.8}, None), StepPrediction("e", 0.5, {"y": 0.7}, None)]
    r = obj.retention("a", blind, tasks)
    assert r["e"] is None and obj.score(r, "e") == -float("inf")
    assert obj.score({"a": 1.0}, None) == pytest.approx(1.0 + 1.0)  # before the expert joins: R_expert = 1


class Blind(Oracle):
    """A step model that tells no plan from another: every model predicted to keep everything."""

    def retentions_many(self, plans, expert) -> list[dict[str, float]]:
        return [{m: 1.0 for m in models} for models, _, _ in plans]


def test_calibration_on_other_subsets_learns_what_the_step_model_misses() -> None:
    res = evaluate_multiway(labels(("abc", "def", "ghi")), Blind())["3way"]
    assert res["subsets"] == 3 and res["targets"] == 9
    # the blind planner takes the first plan it is shown; calibrated on the two other subsets'
    # measured merges, the planner finds the held-out subset's best plans
    measured = {m: r["expert_retention"] + (3 * r["mean_retention"] - r["expert_retention"]) / 2
                for m, r in res.items() if isinstance(r, dict) and "expert_retention" in r}
    assert measured["simmerge_calibrated"] > measured["simmerge"] + 0.3
    assert measured["simmerge_calibrated"] == pytest.approx(measured["oracle"], abs=0.02)
    assert measured["calibrated_random_order"] < measured["simmerge_calibrated"]


def test_one_subset_has_nothing_to_calibrate_on() -> None:
    res = evaluate_multiway(labels(), Oracle())["3way"]
    assert "simmerge_calibrated" not in res and "simmerge" in res
