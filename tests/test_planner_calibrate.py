"""Multi-way calibration (planner/calibrate.py): plan shapes and the ridge fit, without a cluster."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from simmerge_ray.merge.arms import WEIGHTING_NAMES
from simmerge_ray.merge.fold import Fold
from simmerge_ray.planner.calibrate import (FEATURES, RetentionCalibrator, final_shares, halfwidths, pick_correction,
                                            plan_features)
from simmerge_ray.planner.evaluate import (JUDGED, MultiwayTarget, borrowed_residuals, fit_calibration,
                                           held_out_pick_residuals, held_out_residuals, interval_coverage)


@pytest.mark.parametrize("weighting", WEIGHTING_NAMES)
def test_final_shares_are_a_linear_folds_coefficients(weighting: str) -> None:
    for order in itertools.permutations("abcd"):
        fold = Fold(order, ("linear",) * 3, weighting)
        assert final_shares(fold) == pytest.approx(fold.linear_coefficients())
    # a TIES or SLERP step at the same share gives the same shares: the shape, not the operator
    assert final_shares(Fold(tuple("abc"), ("ties", "slerp"), weighting)) == pytest.approx(
        Fold(tuple("abc"), ("linear", "linear"), weighting).linear_coefficients())


def test_plan_features_describe_the_plan_for_its_expert() -> None:
    fold = Fold(("a", "b", "c"), ("ties", "linear"), "anchor")  # shares 1/2, 1/4, 1/4
    x = dict(zip(FEATURES, plan_features(fold, "b", {"a": 0.9, "b": 0.7, "c": None})))
    assert x == pytest.approx({"pred_expert": 0.7, "pred_others": 0.9, "expert_share": 0.25, "max_other_share": 0.5,
                               "ties_steps": 0.5, "slerp_steps": 0.0, "ties_first": 1.0, "weighting_equal": 0.0,
                               "weighting_anchor": 1.0, "expert_position": 0.5, "intercept": 1.0})
    unknown = dict(zip(FEATURES, plan_features(fold, "c", {"a": None, "b": None, "c": None})))
    assert unknown["pred_expert"] == 0.0 and unknown["pred_others"] == 0.0


def test_the_ridge_recovers_a_linear_relation_and_checks_shapes() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(400, len(FEATURES)))
    truth = rng.normal(size=(len(FEATURES), 2))
    cal = RetentionCalibrator.fit(x, x @ truth + rng.normal(scale=1e-3, size=(400, 2)))
    assert np.abs(cal.coef - truth).max() < 0.02
    assert cal.score(x[:3], 1.0, 2.0) == pytest.approx((x[:3] @ truth) @ np.array([1.0, 2.0]), abs=0.05)
    with pytest.raises(ValueError, match=r"expected \[n, 11\] inputs"):
        RetentionCalibrator.fit(x[:, :5], x[:, :2])


def noisy_targets(subsets: int, sigma: float, seed: int = 0, k: int = 3) -> list[MultiwayTarget]:
    """Subsets of k models whose measured retentions are a fixed linear map of the plan inputs
    plus noise."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(scale=0.3, size=(len(FEATURES), 2))
    out = []
    for s in range(subsets):
        for expert in ("a", "b"):
            x = rng.uniform(size=(40, len(FEATURES)))
            x[:, -1] = 1.0
            y = x @ truth + rng.normal(scale=sigma, size=(40, 2))
            out.append(MultiwayTarget(tuple(f"k{k}s{s}{m}" for m in "abcd"[:k]), expert, [], [], [], x.tolist(),
                                      y.tolist()))
    return out


def test_intervals_are_conformal_on_held_out_subsets_and_cover_at_their_level() -> None:
    targets = noisy_targets(12, sigma=0.05)
    res = held_out_residuals(targets)
    assert res.shape == (12 * 2 * 40, 2)
    cal = fit_calibration({3: targets})
    # the half-widths are the normal quantiles of the noise (1.28 and 1.64 sigma), two-sided
    assert cal.halfwidth[3]["80"] == pytest.approx([1.2816 * 0.05] * 2, rel=0.12)
    assert cal.halfwidth[3]["90"] == pytest.approx([1.6449 * 0.05] * 2, rel=0.12)
    cov = interval_coverage(targets, JUDGED)
    for level in ("80", "90"):
        c = cov[level]
        assert c["plans"] == 960 and c["nominal"] == int(level) / 100
        assert abs(c["expert"] - c["nominal"]) < 0.05 and abs(c["others"] - c["nominal"]) < 0.05
        assert 0.0 <= c["picked_expert"] <= 1.0
    assert cov["90"]["mean_width"][0] > cov["80"]["mean_width"][0]
    # two subsets leave no inner residuals to take held-out widths from
    assert interval_coverage(noisy_targets(2, 0.05), JUDGED) is None
    assert fit_calibration({3: noisy_targets(1, 0.05)}).halfwidth == {}


def test_a_thinly_labelled_size_takes_its_widths_from_every_size() -> None:
    three, four = noisy_targets(12, sigma=0.05), noisy_targets(3, sigma=0.2, seed=1, k=4)
    by_size = {3: three, 4: four}
    cal = fit_calibration(by_size)
    assert cal.halfwidth[3] == halfwidths(held_out_residuals(three))  # 12 subsets: widths of its own
    pooled = np.concatenate([held_out_residuals(four), held_out_residuals(three)])
    assert cal.halfwidth[4] == halfwidths(pooled)
    own = halfwidths(held_out_residuals(four))["90"][0]
    assert cal.halfwidth[3]["90"][0] < cal.halfwidth[4]["90"][0] < own  # between the two sizes' noise
    assert borrowed_residuals(by_size, 3) is None and len(borrowed_residuals(by_size, 4)) == len(held_out_residuals(three))
    cov = interval_coverage(four, JUDGED, borrowed_residuals(by_size, 4))
    assert cov["90"]["widths_borrow_other_sizes"] and cov["90"]["plans"] == 3 * 2 * 40
    assert interval_coverage(three, JUDGED)["90"]["widths_borrow_other_sizes"] is False


def test_pick_correction_centres_on_the_median_error() -> None:
    errors = np.column_stack([-0.1 * np.arange(1.0, 11.0), np.full(10, 0.02)])  # expert: -0.1 .. -1.0
    corr = pick_correction(errors)
    assert corr["targets"] == 10 and corr["bias"] == pytest.approx([-0.55, 0.02])
    # |error - median| of the expert: 0.05, 0.05, 0.15, 0.15, ..., 0.45, 0.45; ranks 9 (80%) and 10 (90%) of 10
    assert corr["halfwidth"]["80"] == pytest.approx([0.45, 0.0], abs=1e-12)
    assert corr["halfwidth"]["90"] == pytest.approx([0.45, 0.0], abs=1e-12)
    assert pick_correction(errors[:8])["halfwidth"]["90"] == [None, None]  # rank 9 of 8: unbounded
    assert pick_correction(np.column_stack([errors[:, 0], np.full(10, np.nan)]))["bias"][1] == 0.0  # none defined


def cursed_targets(subsets: int, seed: int = 0) -> list[MultiwayTarget]:
    """The winner's curse: the measured expert retention rises with its prediction up to 0.8 and
    is 0 beyond, so a linear calibrator over-predicts exactly the plans it ranks first."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(subsets):
        for expert in ("a", "b"):
            x = np.zeros((40, len(FEATURES)))
            x[:, -1] = 1.0
            x[:, FEATURES.index("pred_expert")] = u = rng.uniform(size=40)
            y = np.column_stack([np.where(u < 0.8, 0.5 * u, 0.0), np.zeros(40)]) + rng.normal(scale=0.05, size=(40, 2))
            out.append(MultiwayTarget((f"s{s}a", f"s{s}b", f"s{s}c"), expert, [], [], [], x.tolist(), y.tolist()))
    return out


def test_the_top_plan_is_corrected_by_the_held_out_picks_errors() -> None:
    targets = cursed_targets(12)
    errors = held_out_pick_residuals(targets, JUDGED)
    assert errors.shape == (24, 2) and errors[:, 0].mean() < -0.12 and abs(errors[:, 1].mean()) < 0.03
    cal = fit_calibration({3: targets})
    assert cal.pick[3] == pick_correction(errors) and cal.objective == JUDGED.as_dict()
    cov = interval_coverage(targets, JUDGED)
    for level in ("80", "90"):
        c = cov[level]
        # every plan's intervals hold; at the pick they under-cover the expert, the top plan's hold
        assert abs(c["expert"] - c["nominal"]) < 0.03
        assert c["picked_expert"] < c["nominal"] - 0.05 and c["top_plan_expert"] >= c["nominal"] - 0.05
        assert c["top_plan_mean_width"][0] < c["mean_width"][0]  # centred on the bias: narrower too
