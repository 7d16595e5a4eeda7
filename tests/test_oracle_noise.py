"""Eval-set noise in the oracle's headroom (benchmarks/oracle_noise_stats.py): pure numpy, no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.oracle_noise_stats import PairExamples, headroom, noise_report, unit_weights, utilities


def _pairs(rng: np.random.Generator, merge_p: np.ndarray, n: int) -> list[PairExamples]:
    """Pairs of tasks a -> b; on both tasks the expert scores 0.8 and the other model 0.2 in truth,
    and arm j's merge merge_p[pair, j] (so each arm's true utility is (p - 0.2) / 0.6)."""
    draw = lambda p, size=n: (rng.random(size) < p).astype(float)  # noqa: E731
    out = []
    for p in merge_p:
        out.append(PairExamples("a", "b", draw(0.8), draw(0.2), draw(0.2), draw(0.8),
                                np.stack([draw(q) for q in p]), np.stack([draw(q) for q in p])))
    return out


def test_utilities_reproduce_a_hand_computed_two_sided_utility():
    one = lambda *v: np.asarray(v, dtype=float)  # noqa: E731
    p = PairExamples("a", "b", one(1, 1, 1, 0), one(0, 0, 1, 0), one(0, 0, 0, 1), one(1, 1, 0, 1),
                     np.stack([one(1, 1, 0, 0), one(1, 1, 1, 0)]), np.stack([one(1, 0, 0, 0), one(0, 0, 0, 1)]))
    # arm 0: expert side (0.5 - 0.25) / (0.75 - 0.25) = 0.5, aux side (0.25 - 0.25) / 0.5 = 0 -> 0.25
    # arm 1: (0.75 - 0.25) / 0.5 = 1, (0.25 - 0.25) / 0.5 = 0 -> 0.5
    assert utilities([p], unit_weights([p]))[0] == pytest.approx([0.25, 0.5])
    # weights: only the first two examples of each task count
    w = {"a": one(1, 1, 0, 0), "b": one(1, 1, 0, 0)}
    # expert 1 vs other 0 on a; on b expert 0, aux 1 -> arm 0: (1 - 0)/1 = 1 and (0.5 - 0)/1 -> 0.75
    assert utilities([p], w)[0] == pytest.approx([0.75, 0.5])


def test_arms_equal_in_truth_show_a_measured_headroom_that_the_estimates_remove():
    """Nine arms of the same true utility: the oracle's measured headroom is pure noise; the
    split-half estimates remove it, the bootstrap's correction part of it."""
    rng = np.random.default_rng(0)
    pairs = _pairs(rng, np.full((60, 9), 0.5), 200)
    r = noise_report(pairs, np.zeros(60, dtype=int), reps=30, seed=1)
    assert r["headroom"] > 0.05  # the winner's curse, measured
    assert abs(r["half"]["headroom_cross_fitted"]) < 0.01
    assert abs(r["noise_free_headroom"]["split_half"]) < 0.25 * r["headroom"]
    # the bootstrap removes only part of a maximum's bias (its resamples differ by less than the
    # truth and the sample do): an upper estimate
    assert 0.25 * r["headroom"] < r["noise_free_headroom"]["bootstrap"] < 0.75 * r["headroom"]


def test_a_real_headroom_survives_the_noise_estimates():
    """Two arms, each truly better by 0.3 in accuracy (0.5 of utility) on half of the pairs: the
    true headroom is 0.25 and every estimate finds it; a pick of the truly best arm keeps its share."""
    rng = np.random.default_rng(0)
    good = np.arange(40) % 2
    merge_p = np.where(np.eye(2)[good] == 1, 0.8, 0.5)
    pairs = _pairs(rng, merge_p, 2000)
    r = noise_report(pairs, good, reps=20, seed=1)
    for v in (r["headroom"], r["noise_free_headroom"]["bootstrap"], r["noise_free_headroom"]["split_half"],
              r["half"]["headroom_cross_fitted"]):
        assert v == pytest.approx(0.25, abs=0.03)
    assert r["share"] == pytest.approx(1.0, abs=0.05)


def test_headroom_chooses_on_the_other_utilities_when_cross_fitting():
    u = np.array([[0.1, 0.9], [0.5, 0.4]])
    choose = np.array([[0.9, 0.1], [0.5, 0.4]])
    tasks = np.array(["a", "a"])
    assert headroom(u, tasks, np.array([1, 0])) == pytest.approx({"best_fixed": 0.65, "oracle": 0.7, "picked": 0.7})
    # chosen on `choose`: arm 0 for both pairs and as the fixed arm
    assert headroom(u, tasks, np.array([1, 0]), choose_on=choose) == pytest.approx(
        {"best_fixed": 0.3, "oracle": 0.3, "picked": 0.7})
