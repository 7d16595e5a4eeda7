"""How far to trust a plan's numbers: intervals on its predictions, flags where a step's input lies
outside what the selector was trained on, and whether the expert alone (not merging) is
predicted better. No I/O and no Ray: functions of a selector and a plan's predictions (and, for
multi-way plans, of the step model that replays its steps' inputs); pairwise and multi-way `plan`
(and so plan-batch) record their results in plan.json.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.search import RETENTION_CLIP, Objective
from simmerge_ray.selector.calibration import level_key
from simmerge_ray.selector.data import EXPERT_ALONE
from simmerge_ray.selector.model import Selector

if TYPE_CHECKING:
    from simmerge_ray.planner.step_model import SelectorStepModel

SCORE_BOUND = ("the objective at every step's lower and at every step's upper bound: it holds whenever every "
               "step's interval holds (by the union bound, with probability >= 1 - steps x (1 - level) if each "
               "did), but steps merge intermediates that were never built, whose propagated features the "
               "calibration never saw, so this bound's coverage is not measured")
NO_CALIBRATION = ("the selector has no interval calibration (fitted before intervals existed, or with "
                  "--calibration-folds 0): refit with `simmerge fit` to get intervals")
NO_DOMAIN = ("the selector records no training domain (fitted before these checks existed): "
             "out-of-distribution checks skipped; refit with `simmerge fit` to enable them")


def bounds(lo: float, hi: float) -> list[float] | None:
    """[lo, hi], or None for an unbounded interval (too few calibration rows)."""
    return [float(lo), float(hi)] if math.isfinite(lo) and math.isfinite(hi) else None


def _halfwidths(sel: Selector | None, operators: list[str], level: float) -> list[float] | None:
    cal = sel.calibration if sel is not None else None
    if cal is None or level not in cal.levels:
        return None
    i = cal.levels.index(level)
    return [float(cal.halfwidth[i, cal.operators.index(op)]) for op in operators]


def arm_table(sel: Selector, pred: np.ndarray) -> list[dict[str, Any]]:
    """Every arm's predicted value and its interval per level (pairwise plans), best first."""
    intervals = sel.calibration.intervals(np.asarray(pred)[None, :]) if sel.calibration else {}
    rows = [{"operator": op, "predicted": float(p),
             "interval": {key: bounds(lo[0, j], hi[0, j]) for key, (lo, hi) in intervals.items()}}
            for j, (op, p) in enumerate(zip(sel.operators, pred))]
    return sorted(rows, key=lambda r: -r["predicted"])


def plan_intervals(sel: Selector, aux_sel: Selector | None, operators: list[str], u: list[float],
                   v: list[float], objective: Objective | None) -> dict[str, Any]:
    """Per level: each step's interval and the score's bound (SCORE_BOUND). `objective` None: the
    score is the single step's prediction itself (pairwise plans)."""
    if sel.calibration is None:
        return {"available": False, "reason": NO_CALIBRATION}
    levels: dict[str, Any] = {}
    for lv in sel.calibration.levels:
        h = _halfwidths(sel, operators, lv)
        u_lo, u_hi = [x - w for x, w in zip(u, h)], [x + w for x, w in zip(u, h)]
        entry: dict[str, Any] = {"steps": [bounds(lo, hi) for lo, hi in zip(u_lo, u_hi)]}
        if objective is None:
            entry["score"] = entry["steps"][0]
        else:
            hv = _halfwidths(aux_sel, operators, lv) if v else []
            entry["score"] = None if hv is None else bounds(
                objective.score(u_lo, [x - w for x, w in zip(v, hv)]),
                objective.score(u_hi, [x + w for x, w in zip(v, hv)]))
        levels[level_key(lv)] = entry
    out: dict[str, Any] = {"available": True, "levels": levels}
    if objective is not None:
        out["score_bound"] = SCORE_BOUND
    return out


def expert_alone(sel: Selector, aux_sel: Selector | None, objective: Objective | None, k: int,
                 best: float) -> dict[str, Any]:
    """The value of not merging under the plan's objective, against the best plan's `best`.

    Pairwise (`objective` None): the selector's target for the expert alone (EXPERT_ALONE).
    Multi-way: retention_weight x R + aux_weight x V, with R = 1 for a GapClosed selector (no step
    loses any of the expert's gap) and V = the auxiliary target's value (0: nothing gained on
    the other tasks). For another target a product of step predictions has no expert-alone
    value beyond one step, so only 2-way plans get one."""
    target = sel.meta.get("target")
    if target not in EXPERT_ALONE:
        return {"available": False, "reason": "the selector records no target (selector.json meta.target)"}
    if objective is None:
        value = EXPERT_ALONE[target]
    else:
        if target != "gap_closed" and k > 2:
            return {"available": False, "reason": f"the selector predicts {target}, and a product of several "
                                                  f"steps' {target} has no expert-alone value; it is defined for "
                                                  f"2-way plans and for gap_closed selectors"}
        per_step = min(max(EXPERT_ALONE[target], RETENTION_CLIP[0]), RETENTION_CLIP[1])
        aux_value = 0.0  # without an auxiliary selector the search scores no auxiliary term
        if aux_sel is not None and objective.aux_weight:
            aux_target = aux_sel.meta.get("target")
            if aux_target not in EXPERT_ALONE:
                return {"available": False, "reason": "the auxiliary selector records no target"}
            aux_value = EXPERT_ALONE[aux_target]
        value = objective.retention_weight * per_step + objective.aux_weight * aux_value
    return {"available": True, "target": target, "value": value, "best": float(best),
            "better": bool(best < value), "margin": float(value - best)}


def input_flags(sel: Selector, z_rows: np.ndarray, models: list[str], model_tasks: dict[str, str | None],
                task: str) -> list[dict[str, Any]]:
    """Flags of each step j (merging models[:j] with models[j], standardised input z_rows[j-1]):
    a same-task step when the labels held no same-task pair, an input whose largest |z| exceeds
    the training rows' threshold."""
    domain = sel.domain
    if domain is None:
        return [{"kind": "unchecked", "step": None, "message": NO_DOMAIN}]
    flags: list[dict[str, Any]] = []
    for j in range(1, len(models)):
        merged, nxt = models[:j], models[j]
        where = (f"step {j} (merging {nxt} into {' + '.join(merged)})" if len(models) > 2
                 else f"{merged[0]} + {nxt}")
        t = model_tasks.get(nxt)
        shared = [m for m in merged if t is not None and model_tasks.get(m) == t]
        if not shared and t == task:
            shared = [merged[0]]  # the expert of the target task
        if domain.same_task_pairs is False and shared:
            flags.append({"kind": "same_task", "step": j, "model": nxt, "task": t, "shares_task_with": shared,
                          "message": f"{where}: {nxt} is a {t} expert like {', '.join(shared)}; no labelled pair "
                                     f"had two experts of one task, so this prediction extrapolates"})
        out = domain.outlier(z_rows[j - 1])
        if out is not None:
            lo, hi = out["training_range"]
            flags.append({"kind": "out_of_range", "step": j, **out,
                          "message": f"{where}: input outside the training rows: {out['feature']} at z = "
                                     f"{out['z']:+.1f} (99% of training rows have every |z| <= "
                                     f"{out['threshold']:.1f}; this feature spanned [{lo:+.1f}, {hi:+.1f}])"})
    return flags


def assess_plan(plan: Plan, step_model: SelectorStepModel, model_tasks: dict[str, str | None],
                objective: Objective) -> None:
    """Fill a multi-way plan's intervals, flags and expert-alone comparison in place."""
    sel, aux = step_model.selector, step_model.aux_selector
    z = sel.standardise(step_model.plan_inputs(plan.models, plan.operators, plan.task))
    plan.intervals = plan_intervals(sel, aux, plan.operators, plan.step_utility, plan.step_aux_utility, objective)
    plan.flags = input_flags(sel, z, plan.models, model_tasks, plan.task)
    plan.expert_alone = expert_alone(sel, aux, objective, plan.k, plan.score)
