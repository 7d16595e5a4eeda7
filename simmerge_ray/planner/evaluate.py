"""Judging multi-way plans on the testbed's measured 3- and 4-way merges.

For every labelled subset and every task of its models (that task's model is the expert), the
planner ranks the subset's labelled plans (orders with the expert anywhere, fold weightings,
step arms) with predicted values only; we then read each plan's measured retention,
s_merge / s_model - 1 of every model on its own task:
- simmerge: the planner's top plan;
- random_order: the planner's weighting and step arms in a uniformly random order (the
  expectation over the labelled orders of that rule);
- one entry per step arm: that arm at every step, in a random order under a random weighting;
- equal_share: the equal-weight linear fold (a model soup of the subset);
- oracle: the plan whose measured value of the planner's objective is best, and
  oracle_random_order its weighting and step arms in a random order;
- simmerge_calibrated: the planner's top plan once its predicted retentions are calibrated on the
  measured merges of the other subsets of the same size (planner/calibrate.py: leave one subset
  out), and calibrated_random_order its weighting and step arms in a random order.
Each entry reports `expert_retention` (the expert's) and `mean_retention` (the mean over the
plan's models). Baselines are expectations over labelled plans, not draws: no sampling noise.
`order_gain` says how much of "minus random order" the order itself can buy: per picked rule,
the measured gain of the pick and of the rule's best labelled order (on mean retention) over
the rule in a random order; a ceiling for any planner that keeps the rule.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from simmerge_ray.merge.arms import STEP_ARMS
from simmerge_ray.merge.fold import Fold
from simmerge_ray.planner.calibrate import (FEATURES, MultiwayCalibration, RetentionCalibrator, halfwidths,
                                            pick_correction, plan_features)
from simmerge_ray.planner.objective import Objective, Outcome
from simmerge_ray.planner.search import Replayer, StepModel

# The objective plans are judged on: the expert's side and the others' sides weigh the same, as
# in the pairwise two-sided utility.
JUDGED = Objective(retention_weight=1.0, aux_weight=1.0)
EQUAL_SHARE = ("linear", "equal")


class PlanScorer:
    """Predicted objective of given plans, sharing prefix predictions between plans of a target."""

    def __init__(self, model: StepModel, tasks: Mapping[str, str | None], objective: Objective = JUDGED) -> None:
        self.model = model
        self.tasks = tasks
        self.objective = objective
        self._replayers: dict[str, Replayer] = {}

    def retentions_many(self, plans: Sequence[tuple[Sequence[str], Sequence[str], str | None]], expert: str
                        ) -> list[dict[str, float | None]]:
        """Predicted R per model of each (models, step arms, weighting) with `expert` as the expert."""
        task = self.tasks[expert]
        rp = self._replayers.setdefault(task, Replayer(self.model, task, self.tasks))
        return [self.objective.retention(p[0][0], steps, self.tasks) for p, steps in zip(plans, rp.replay_many(plans))]

    def score_many(self, plans: Sequence[tuple[Sequence[str], Sequence[str], str | None]], expert: str) -> list[float]:
        """Predicted objective of each (models, step arms, weighting) with `expert` as the expert."""
        return [self.objective.score(r, expert) for r in self.retentions_many(plans, expert)]

    def score(self, models: Sequence[str], ops: Sequence[str], weighting: str | None, expert: str) -> float:
        return self.score_many([(models, ops, weighting)], expert)[0]


def _measured_score(objective: Objective, retention: Mapping[str, float | None], expert: str) -> float:
    return objective.score({m: None if r is None else 1 + r for m, r in retention.items()}, expert)


def _mean(outcomes: list[Outcome]) -> dict[str, float]:
    return {"expert_retention": _nanmean([o.expert_retention for o in outcomes]),
            "mean_retention": _nanmean([o.mean_retention for o in outcomes])}


def _nanmean(values: Sequence[float]) -> float:
    """np.nanmean without its RuntimeWarning on a group with no defined value (NaN, as it gives)."""
    a = np.asarray(values, dtype=np.float64)
    defined = a[~np.isnan(a)]
    return float(defined.mean()) if defined.size else float("nan")


@dataclass
class MultiwayTarget:
    """One (subset, expert) of the labels: its plans, their measured outcomes, the planner's
    predicted objective, and what the calibrator reads (features) and learns (targets) of each."""

    subset: tuple[str, ...]
    expert: str
    plans: list[tuple]  # (models, step arms, weighting, measured retention)
    outcomes: list[Outcome]
    predicted: list[float]
    features: list[list[float]]
    targets: list[list[float]]  # measured expert retention, others' mean retention (NaN: undefined)


def _calibration_target(measured: Mapping[str, float | None], expert: str) -> list[float]:
    others = [v for m, v in measured.items() if m != expert and v is not None]
    e = measured.get(expert)
    return [np.nan if e is None else float(e), float(np.mean(others)) if others else np.nan]


def multiway_targets(labels: pl.DataFrame, scorer: PlanScorer) -> dict[int, list[MultiwayTarget]]:
    """Every labelled 3-/4-way subset with each of its models as the expert, by plan size."""
    rows = labels.filter(pl.col("k") >= 3).select(["models", "operators", "weighting", "k", "retention"]).rows()
    subsets: dict[tuple, list[tuple]] = defaultdict(list)
    for models, ops, weighting, k, retention in rows:
        subsets[tuple(sorted(models))].append((tuple(models), tuple(ops), weighting, json.loads(retention)))
    by_size: dict[int, list[MultiwayTarget]] = defaultdict(list)
    for subset, plans in sorted(subsets.items()):
        for expert in subset:
            retentions = scorer.retentions_many([(m, o, w) for m, o, w, _ in plans], expert)
            by_size[len(subset)].append(MultiwayTarget(
                subset, expert, plans, [Outcome.of(r, expert) for *_, r in plans],
                [scorer.objective.score(r, expert) for r in retentions],
                [plan_features(Fold(m, o, w), expert, r) for (m, o, w, _), r in zip(plans, retentions)],
                [_calibration_target(measured, expert) for *_, measured in plans]))
    return dict(by_size)


def _rows(targets: Sequence[MultiwayTarget]) -> tuple[np.ndarray, np.ndarray]:
    """Calibration inputs and targets of every plan whose targets are defined."""
    rows = [(x, y) for t in targets for x, y in zip(t.features, t.targets) if np.isfinite(y).all()]
    return (np.array([x for x, _ in rows]).reshape(-1, len(FEATURES)),
            np.array([y for _, y in rows]).reshape(-1, 2))


def _fit(targets: Sequence[MultiwayTarget]) -> RetentionCalibrator | None:
    x, y = _rows(targets)
    return RetentionCalibrator.fit(x, y) if len(x) else None


def _leave_one_subset_out(targets: Sequence[MultiwayTarget]
                          ) -> Iterator[tuple[list[MultiwayTarget], list[MultiwayTarget], RetentionCalibrator]]:
    """Per labelled subset: its targets, the other subsets' targets, and a calibrator fitted on
    those others only (subsets whose others give no calibrator are skipped)."""
    for subset in sorted({t.subset for t in targets}):
        rest = [t for t in targets if t.subset != subset]
        cal = _fit(rest)
        if cal is not None:
            yield [t for t in targets if t.subset == subset], rest, cal


def held_out_residuals(targets: Sequence[MultiwayTarget]) -> np.ndarray:
    """[n, 2] absolute residuals of every plan, predicted by a calibrator fitted on the other
    subsets only (leave one subset out): the error on a subset the calibrator never saw."""
    out = []
    for held, _, cal in _leave_one_subset_out(targets):
        x, y = _rows(held)
        if len(x):
            out.append(np.abs(y - cal.predict(x)))
    return np.concatenate(out) if out else np.empty((0, 2))


def held_out_pick_residuals(targets: Sequence[MultiwayTarget], objective: Objective) -> np.ndarray:
    """[n targets, 2] signed errors (measured - calibrated) of each target's calibrated pick, picked
    and predicted by a calibrator fitted on the other subsets only (leave one subset out)."""
    out = [np.asarray(t.targets[pick], dtype=np.float64) - cal.predict([t.features[pick]])[0]
           for held, _, cal in _leave_one_subset_out(targets) for t in held
           for pick in [_calibrated_pick(cal, t, objective)]]
    return np.array(out).reshape(-1, 2)


# A plan size labelled on fewer subsets than this takes its interval half-widths from the held-out
# residuals of every size together. Residuals cluster by subset (each subset shifts them its own
# way), so a quantile over two or three subsets' residuals is mostly those subsets' shifts: on the
# demo's labels, 4-way intervals from their own 3 subsets covered the others' mean 81% of the time
# at 90% nominal, and 90% once the 8 three-way subsets' residuals joined them.
OWN_WIDTHS_MIN_SUBSETS = 5
MIN_COVERAGE_SUBSETS = 3  # held-out subsets below which coverage is not measured (no inner residuals)


def _subsets(targets: Sequence[MultiwayTarget]) -> int:
    return len({t.subset for t in targets})


def borrowed_residuals(by_size: Mapping[int, Sequence[MultiwayTarget]], k: int,
                       objective: Objective | None = None) -> np.ndarray | None:
    """The other sizes' held-out residuals (with `objective`: of their calibrated picks), for a
    size too thinly labelled for widths of its own (None: size k has enough subsets)."""
    if _subsets(by_size[k]) >= OWN_WIDTHS_MIN_SUBSETS:
        return None
    others = [held_out_residuals(t) if objective is None else held_out_pick_residuals(t, objective)
              for j, t in sorted(by_size.items()) if j != k]
    return np.concatenate([np.empty((0, 2)), *others])


def _joined(res: np.ndarray, borrowed: np.ndarray | None) -> np.ndarray:
    return res if borrowed is None or not len(res) else np.concatenate([res, borrowed])


def fit_calibration(by_size: Mapping[int, Sequence[MultiwayTarget]], objective: Objective = JUDGED
                    ) -> MultiwayCalibration:
    """One calibrator per plan size, fitted on every labelled subset of that size, with the
    conformal half-widths of its leave-one-subset-out residuals, and the correction and widths of
    its top plan from the leave-one-subset-out errors of the picks under `objective` (each joined
    by the other sizes' where the size has fewer than OWN_WIDTHS_MIN_SUBSETS subsets; none where
    no residual is left)."""
    fitted = {k: cal for k, targets in by_size.items() if (cal := _fit(targets)) is not None}
    widths, picks = {}, {}
    for k in fitted:
        res = _joined(held_out_residuals(by_size[k]), borrowed_residuals(by_size, k))
        if len(res):
            widths[k] = halfwidths(res)
        pick_res = _joined(held_out_pick_residuals(by_size[k], objective), borrowed_residuals(by_size, k, objective))
        if len(pick_res):
            picks[k] = pick_correction(pick_res)
    return MultiwayCalibration(fitted, {k: _subsets(by_size[k]) for k in fitted}, widths, picks, objective.as_dict())


def _finite(pair: Sequence[float | None]) -> np.ndarray:
    return np.array([np.inf if v is None else v for v in pair])


def interval_coverage(targets: Sequence[MultiwayTarget], objective: Objective, borrowed: np.ndarray | None = None,
                      borrowed_picks: np.ndarray | None = None) -> dict[str, dict] | None:
    """Measured coverage of the calibrated intervals on held-out subsets, nested: each subset's
    plans are predicted, and their half-widths taken, from the other subsets only (the widths
    from residuals of calibrators that saw neither that subset nor the residual's own, joined by
    `borrowed`, other sizes' residuals, as fit_calibration joins them; the top plan's correction
    and widths likewise from the other subsets' picks, joined by `borrowed_picks`). Per level:
    over every plan, over each target's calibrated pick with the per-plan widths (`picked_*`) and
    with the top plan's (`top_plan_*`), and the mean widths. None with fewer than 3 subsets (no
    inner residuals to take widths from)."""
    if _subsets(targets) < MIN_COVERAGE_SUBSETS:
        return None
    inside: dict[str, list[np.ndarray]] = defaultdict(list)
    picked: dict[str, list[np.ndarray]] = defaultdict(list)
    top: dict[str, list[np.ndarray]] = defaultdict(list)
    widths: dict[str, list[list[float]]] = defaultdict(list)
    top_widths: dict[str, list[list[float]]] = defaultdict(list)
    for held, rest, cal in _leave_one_subset_out(targets):
        hw = halfwidths(_joined(held_out_residuals(rest), borrowed))
        corr = pick_correction(_joined(held_out_pick_residuals(rest, objective), borrowed_picks))
        for t in held:
            y = np.asarray(t.targets, dtype=np.float64)
            pred = cal.predict(t.features)
            pick = _calibrated_pick(cal, t, objective)
            defined = np.isfinite(y).all(axis=1)
            err = y[pick] - pred[pick] - np.array(corr["bias"])
            for lv, pair in hw.items():
                h = _finite(pair)
                ok = (np.abs(y - pred) <= h).astype(np.float64)
                inside[lv].append(ok[defined])
                widths[lv].append([2 * v for v in h])
                h_top = _finite(corr["halfwidth"][lv])
                top_widths[lv].append([2 * v for v in h_top])
                if defined[pick]:
                    picked[lv].append(ok[pick:pick + 1])
                    top[lv].append((np.abs(err) <= h_top).astype(np.float64)[None, :])
    out = {}
    for lv in inside:
        cells = np.concatenate(inside[lv])
        picks = np.concatenate(picked[lv]) if picked[lv] else np.full((1, 2), np.nan)  # NaN: no defined pick
        tops = np.concatenate(top[lv]) if top[lv] else np.full((1, 2), np.nan)
        out[lv] = {"nominal": int(lv) / 100, "plans": len(cells),
                   "expert": float(cells[:, 0].mean()), "others": float(cells[:, 1].mean()),
                   "picked_expert": float(picks[:, 0].mean()), "picked_others": float(picks[:, 1].mean()),
                   "top_plan_expert": float(tops[:, 0].mean()), "top_plan_others": float(tops[:, 1].mean()),
                   "mean_width": [float(w) for w in np.mean(widths[lv], axis=0)],
                   "top_plan_mean_width": [float(w) for w in np.mean(top_widths[lv], axis=0)],
                   "widths_borrow_other_sizes": borrowed is not None}
    return out


def _rule(t: MultiwayTarget, pick: int) -> list[Outcome]:
    """Every labelled order of the picked plan's weighting and step arms."""
    _, p_ops, p_w, _ = t.plans[pick]
    return [o for (m, ops, w, _), o in zip(t.plans, t.outcomes) if ops == p_ops and w == p_w]


def _same_rule(t: MultiwayTarget, pick: int) -> Outcome:
    """The picked plan's weighting and step arms in a random order: the mean over its orders."""
    return Outcome(**_mean(_rule(t, pick)))


def _best_order(t: MultiwayTarget, pick: int) -> Outcome:
    """The picked rule in its labelled order of best mean retention."""
    return max(_rule(t, pick), key=lambda o: -np.inf if np.isnan(o.mean_retention) else o.mean_retention)


def calibrated_picks(targets: list[MultiwayTarget], objective: Objective) -> dict[int, list[Outcome]]:
    """Leave one subset out: each target's plan is the top one by a calibrator fitted on the other
    subsets' targets; returns {index: [picked outcome, its rule in a random order, its rule in
    the best labelled order]}."""
    index = {id(t): i for i, t in enumerate(targets)}
    picks: dict[int, list[Outcome]] = {}
    for held, _, cal in _leave_one_subset_out(targets):
        for t in held:
            pick = _calibrated_pick(cal, t, objective)
            picks[index[id(t)]] = [t.outcomes[pick], _same_rule(t, pick), _best_order(t, pick)]
    return picks


def _calibrated_pick(cal: RetentionCalibrator, t: MultiwayTarget, objective: Objective) -> int:
    """The plan of `t` whose calibrated retentions score best on the objective."""
    return int(np.argmax(cal.score(t.features, objective.retention_weight, objective.aux_weight)))


def evaluate_multiway(labels: pl.DataFrame, scorer: PlanScorer,
                      by_size: Mapping[int, list[MultiwayTarget]] | None = None) -> dict:
    """Mean measured retentions per plan size and method, overall and per target task
    (`by_size`: multiway_targets(labels, scorer), when already computed)."""
    by_size = multiway_targets(labels, scorer) if by_size is None else by_size
    per: dict[int, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    per_task: dict[int, dict[str, dict[str, list[Outcome]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for k, targets in sorted(by_size.items()):
        calibrated = calibrated_picks(targets, scorer.objective)
        for i, t in enumerate(targets):
            pick = int(np.argmax(t.predicted))
            measured = [_measured_score(scorer.objective, r, t.expert) for *_, r in t.plans]
            best = int(np.argmax(measured))
            values = {"simmerge": [t.outcomes[pick]], "random_order": [_same_rule(t, pick)],
                      "best_order": [_best_order(t, pick)], "oracle": [t.outcomes[best]],
                      "oracle_random_order": [_same_rule(t, best)]}
            if i in calibrated:
                for key, outcome in zip(("simmerge_calibrated", "calibrated_random_order", "calibrated_best_order"),
                                        calibrated[i]):
                    values[key] = [outcome]
            for op in STEP_ARMS:
                values[op] = [o for (m, ops, w, _), o in zip(t.plans, t.outcomes) if set(ops) == {op}]
            values["equal_share"] = [o for (m, ops, w, _), o in zip(t.plans, t.outcomes)
                                     if set(ops) == {EQUAL_SHARE[0]} and w == EQUAL_SHARE[1]]
            for method, outs in values.items():
                if outs:
                    avg = Outcome(**_mean(outs))
                    per[k][method].append(avg)
                    per_task[k][scorer.tasks[t.expert]][method].append(avg)
    result: dict = {}
    for k in sorted(per):
        by_task = {t: {m: _mean(v) for m, v in d.items()} for t, d in sorted(per_task[k].items())}
        means = {m: _mean(v) for m, v in per[k].items()}
        result[f"{k}way"] = {
            "subsets": _subsets(by_size[k]),
            "targets": len(per[k]["simmerge"]),
            **means,
            "order_gain": _order_gain(means),
            "calibrated_intervals": interval_coverage(by_size[k], scorer.objective, borrowed_residuals(by_size, k),
                                                      borrowed_residuals(by_size, k, scorer.objective)),
            "by_task": by_task,
            "learned_minus_random_order": {
                t: {key: d["simmerge"][key] - d["random_order"][key] for key in ("expert_retention", "mean_retention")}
                for t, d in by_task.items()},
        }
    result["objective"] = scorer.objective.as_dict()
    return result


# (pick, its rule in a random order, its rule in the best labelled order) per method
_ORDER_GAIN = {"simmerge": ("simmerge", "random_order", "best_order"),
               "simmerge_calibrated": ("simmerge_calibrated", "calibrated_random_order", "calibrated_best_order"),
               "oracle": ("oracle", "oracle_random_order", None)}


def _order_gain(means: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Points of mean retention over the same rule in a random order: `measured` for the pick,
    `ceiling` for the rule's best labelled order (what a perfect orderer of that rule gets)."""
    out = {}
    for method, (pick, rand, best) in _ORDER_GAIN.items():
        if pick in means:
            gain = {"measured": means[pick]["mean_retention"] - means[rand]["mean_retention"]}
            if best is not None:
                gain["ceiling"] = means[best]["mean_retention"] - means[rand]["mean_retention"]
            out[method] = gain
    return out
