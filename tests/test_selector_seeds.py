"""The seed benchmark's statistics (benchmarks/selector_seeds.py): pure numpy, no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.selector_seeds import pick_summary, seed_report


def test_pick_summary_on_hand_computed_picks() -> None:
    # two tasks of two rows; arm 0 is the best fixed arm (task means 0.5 and 0.5), the oracle 0.75
    y = np.array([[0.5, 1.0], [0.5, 0.0], [0.5, 1.0], [0.5, 0.0]])
    tasks = ["a", "a", "b", "b"]
    perfect = y.copy()
    s = pick_summary(y, tasks, perfect, perfect)
    assert s == {"utility": 0.75, "headroom_share": 1.0, "selection_accuracy": 1.0, "agrees_with_reference": 1.0}
    half = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # right on rows 0 and 3
    s = pick_summary(y, tasks, half, perfect)
    # utility: task a (1.0 + 0.0) / 2 = 0.5, task b (0.5 + 0.5) / 2 = 0.5 -> 0.5, share 0
    assert s == pytest.approx({"utility": 0.5, "headroom_share": 0.0, "selection_accuracy": 0.5,
                               "agrees_with_reference": 0.5})


def test_the_ensemble_averages_the_seeds_predictions() -> None:
    y = np.array([[0.5, 1.0], [0.5, 0.0], [0.5, 1.0], [0.5, 0.0]])
    tasks = ["a", "a", "b", "b"]
    # each seed gets one row wrong by a small margin; their mean is right everywhere
    seeds = [y + np.array([[0.6, 0], [0, 0], [0, 0], [0, 0]]), y + np.array([[0, 0], [0, 0], [0, 0], [0, 0.6]])]
    r = seed_report(y, tasks, seeds)
    assert [s["selection_accuracy"] for s in r["per_seed"]] == [0.75, 0.75]
    assert r["per_seed"][1]["agrees_with_reference"] == 0.5  # the two seeds differ on rows 0 and 3
    assert r["ensemble"]["selection_accuracy"] == 1.0 and r["ensemble"]["headroom_share"] == 1.0
    assert r["share_min"] == r["share_max"] == r["share_mean"] == pytest.approx(0.5)
