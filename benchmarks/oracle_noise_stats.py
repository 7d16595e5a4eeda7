"""How much of the oracle's headroom over the best fixed arm is eval-set noise.

The oracle takes, per pair, the arm whose *measured* utility is highest. With eval sets of a few
hundred examples that maximum is biased upwards (a winner's curse): arms that differ by less than
the noise take turns at the top. The best fixed arm (one arm for all pairs) and a selector's pick
(made from features, never from the pair's own scores) carry almost no such bias, so the headroom
`oracle - best fixed` overstates what any selector could gain, and a selector's share of it
understates its real share.

Given every model's accuracy on every eval example, utilities are re-measured under resampled
eval sets (every task's examples reweighted, models and pairs fixed):
  - bootstrap: examples drawn with replacement; the headroom's bias is estimated as mean(H*) - H,
    so 2H - mean(H*) is its bias-corrected value. For a maximum this under-corrects (the
    resamples' arms differ by what the sample's do, more than the truth's): an upper estimate;
  - split halves: each task's examples cut in two at random. Choosing the arm (and the fixed arm)
    on one half and judging it on the other gives a cross-fitted headroom that the judging half's
    noise cannot inflate; a lower estimate, since the choice sees half the data. The in-sample headroom
    on halves exceeds the full set's by the extra noise of half the examples; with inflation
    proportional to the noise's scale (1/sqrt(n)), the full set's inflation is that excess
    over sqrt(2) - 1.
Pure numpy; oracle_noise.py measures the per-example accuracies (testbed/labels.py PlanEvaluator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simmerge_ray.selector.data import UTILITY_CLIP

Weights = dict[str, np.ndarray]  # task -> weight of every eval example


@dataclass(frozen=True)
class PairExamples:
    """One (expert, auxiliary) pair: per-example accuracy of the two models and of every arm's
    merge, on the expert's task (`task`) and on the auxiliary's (`aux_task`)."""

    task: str
    aux_task: str
    expert_on_task: np.ndarray  # [n_task]
    aux_on_task: np.ndarray  # [n_task]
    expert_on_aux: np.ndarray  # [n_aux]
    aux_on_aux: np.ndarray  # [n_aux]
    merges_on_task: np.ndarray  # [arms, n_task]
    merges_on_aux: np.ndarray  # [arms, n_aux]


def utilities(pairs: Sequence[PairExamples], weights: Weights) -> np.ndarray:
    """[pairs, arms] two-sided utility (METHOD.md, clipped as the selector's target is) with every
    eval example weighted; weights of ones give the label run's values."""
    out = np.empty((len(pairs), pairs[0].merges_on_task.shape[0]))
    for i, p in enumerate(pairs):
        wt, wu = weights[p.task] / weights[p.task].sum(), weights[p.aux_task] / weights[p.aux_task].sum()
        s_e, s_a = p.expert_on_task @ wt, p.aux_on_task @ wt
        s_ea, s_aa = p.expert_on_aux @ wu, p.aux_on_aux @ wu
        out[i] = ((p.merges_on_task @ wt - s_a) / (s_e - s_a) + (p.merges_on_aux @ wu - s_ea) / (s_aa - s_ea)) / 2
    return np.clip(out, *UTILITY_CLIP)


def task_mean(values: np.ndarray, tasks: np.ndarray) -> float:
    """The unweighted mean of the per-task means, as the selector's report averages."""
    return float(np.mean([values[tasks == t].mean() for t in np.unique(tasks)]))


def headroom(u: np.ndarray, tasks: np.ndarray, pick: np.ndarray, choose_on: np.ndarray | None = None) -> dict[str, float]:
    """Best fixed arm, oracle and the picked arms' mean utility on `u`; with `choose_on`, the
    oracle's arms and the fixed arm are chosen on those utilities instead (cross-fitting)."""
    c = u if choose_on is None else choose_on
    rows = np.arange(len(u))
    fixed = int(np.argmax([task_mean(c[:, j], tasks) for j in range(u.shape[1])]))
    return {"best_fixed": task_mean(u[:, fixed], tasks), "oracle": task_mean(u[rows, c.argmax(1)], tasks),
            "picked": task_mean(u[rows, pick], tasks)}


def unit_weights(pairs: Sequence[PairExamples]) -> Weights:
    """Every example of every task weighted 1: the eval sets as measured."""
    return {t: np.ones(len(v)) for p in pairs for t, v in ((p.task, p.expert_on_task), (p.aux_task, p.expert_on_aux))}


def noise_report(pairs: Sequence[PairExamples], pick: np.ndarray, *, reps: int = 200, seed: int = 0) -> dict:
    """Measured headroom and the picked arms' share of it, beside the bootstrap and split-half
    estimates of the headroom without the eval sets' noise (see the module docstring)."""
    tasks = np.asarray([p.task for p in pairs])
    n = {t: len(w) for t, w in unit_weights(pairs).items()}
    full = headroom(utilities(pairs, unit_weights(pairs)), tasks, pick)
    rng = np.random.default_rng(seed)
    boot, boot_gain, half_in, half_cross, half_gain = [], [], [], [], []
    for _ in range(reps):
        b = headroom(utilities(pairs, {t: np.bincount(rng.integers(0, k, k), minlength=k).astype(float)
                                       for t, k in n.items()}), tasks, pick)
        boot.append(b["oracle"] - b["best_fixed"])
        boot_gain.append(b["picked"] - b["best_fixed"])
        first = {t: (rng.permutation(k) < k // 2).astype(float) for t, k in n.items()}
        halves = [utilities(pairs, first), utilities(pairs, {t: 1 - w for t, w in first.items()})]
        for judge, choose in ((0, 1), (1, 0)):
            h = headroom(halves[judge], tasks, pick)
            half_in.append(h["oracle"] - h["best_fixed"])
            x = headroom(halves[judge], tasks, pick, choose_on=halves[choose])
            half_cross.append(x["oracle"] - x["best_fixed"])
            half_gain.append(x["picked"] - x["best_fixed"])
    h = full["oracle"] - full["best_fixed"]
    gain = full["picked"] - full["best_fixed"]
    inflation = (float(np.mean(half_in)) - h) / (math.sqrt(2) - 1)
    corrected = {"bootstrap": 2 * h - float(np.mean(boot)), "split_half": h - inflation}
    return {
        "pairs": len(pairs), "examples": n, "reps": reps, "seed": seed, **full,
        "headroom": h, "picked_gain": gain, "share": gain / h if h > 0 else None,
        "headroom_se": float(np.std(boot)), "picked_gain_se": float(np.std(boot_gain)),
        "bootstrap_headroom_mean": float(np.mean(boot)),
        "half": {"headroom_in_sample": float(np.mean(half_in)), "headroom_cross_fitted": float(np.mean(half_cross)),
                 "picked_gain_cross_fitted": float(np.mean(half_gain))},
        "noise_free_headroom": corrected,
        "share_of_noise_free": {k: gain / v if v > 0 else None for k, v in corrected.items()},
    }
