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
from simmerge_ray.planner.objective import Objective, StepPrediction
from simmerge_ray.selector.calibration import level_key
from simmerge_ray.selector.data import EXPERT_ALONE
from simmerge_ray.selector.domain import spread
from simmerge_ray.selector.model import Selector

if TYPE_CHECKING:
    from simmerge_ray.planner.step_model import SelectorStepModel

SCORE_BOUND = ("the objective at every step's lower and at every step's upper bound: it holds whenever every "
               "step's interval holds (by the union bound, with probability >= 1 - intervals x (1 - level) if each "
               "did, counting two intervals for a step judged on both sides), but steps merge intermediates that were never built, whose propagated features the "
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


def plan_intervals(sel: Selector, operators: list[str], u: list[float]) -> dict[str, Any]:
    """Pairwise plans: per level, the step's interval, which is the score's."""
    if sel.calibration is None:
        return {"available": False, "reason": NO_CALIBRATION}
    levels: dict[str, Any] = {}
    for lv in sel.calibration.levels:
        h = _halfwidths(sel, operators, lv)
        steps = [bounds(x - w, x + w) for x, w in zip(u, h)]
        levels[level_key(lv)] = {"steps": steps, "score": steps[0]}
    return {"available": True, "levels": levels}


PROXY_TARGET = "retention (two-sided utility proxy)"  # expert_alone's target where U stands in for R


def expert_alone(sel: Selector, objective: Objective | None, best: float, *, proxy: bool = False) -> dict[str, Any]:
    """The value of not merging under the plan's objective, against the best plan's `best`.

    Pairwise (`objective` None): the selector's target for the expert alone (EXPERT_ALONE).
    Multi-way: the expert keeps its whole gap (R = 1) and no other model keeps any of its own, so
    the value is retention_weight x 1 + aux_weight x 0. With `proxy` (a utility selector without
    its auxiliary twin) the plan's R of the expert is the two-sided utility U, whose value for the
    expert alone is EXPERT_ALONE["utility"], not 1: that is what the plan is compared with (at
    2-way, the pairwise verdict), or a plan of U = 0.57 was "worse than not merging" where the
    pairwise plan of the same merge was better."""
    if objective is not None:
        value = objective.retention_weight * (EXPERT_ALONE["utility"] if proxy else 1.0)
        return {"available": True, "target": PROXY_TARGET if proxy else "retention",
                "value": value, "best": float(best), "better": bool(best < value), "margin": float(value - best)}
    target = sel.meta.get("target")
    if target not in EXPERT_ALONE:
        return {"available": False, "reason": "the selector records no target (selector.json meta.target)"}
    value = EXPERT_ALONE[target]
    return {"available": True, "target": target, "value": value, "best": float(best),
            "better": bool(best < value), "margin": float(value - best)}


def input_flags(sel: Selector, z_rows: np.ndarray, models: list[str], model_tasks: dict[str, str | None],
                task: str, expert: str | None = None) -> list[dict[str, Any]]:
    """Flags of each step j (merging models[:j] with models[j], standardised input z_rows[j-1]):
    a same-task step when the labels held no same-task pair, an input whose largest |z| exceeds
    the training rows' threshold; and an expert the catalog gives another task than `task`. `expert` (default models[0]) counts as a model of `task` even
    where the catalog gives it no task."""
    expert = expert or models[0]
    flags: list[dict[str, Any]] = []
    own = model_tasks.get(expert)
    if own is not None and own != task:
        flags.append({"kind": "expert_task", "step": None, "model": expert, "task": own,
                      "message": f"{expert} is the catalog's {own} expert but is planned as the {task} expert: "
                                 f"its gap is judged on {task}"})
    domain = sel.domain
    if domain is None:
        return [*flags, {"kind": "unchecked", "step": None, "message": NO_DOMAIN}]
    for j in range(1, len(models)):
        merged, nxt = models[:j], models[j]
        where = (f"step {j} (merging {nxt} into {' + '.join(merged)})" if len(models) > 2
                 else f"{merged[0]} + {nxt}")
        t = model_tasks.get(nxt)
        shared = [m for m in merged if t is not None and model_tasks.get(m) == t]
        like = f"like {', '.join(shared)}"
        if not shared and t == task and expert in merged:
            shared = [expert]  # the expert of the target task, untagged in the catalog
            like = f"and {expert} is this plan's {task} expert"
        if domain.same_task_pairs is False and shared:
            flags.append({"kind": "same_task", "step": j, "model": nxt, "task": t, "shares_task_with": shared,
                          "message": f"{where}: {nxt} is a {t} expert {like}; no labelled pair "
                                     f"had two experts of one task, so this prediction extrapolates"})
        out = domain.outlier(z_rows[j - 1])
        if out is not None:
            flags.append({"kind": "out_of_range", "step": j, **out,
                          "message": f"{where}: input outside the training rows: {out['feature']} at z = "
                                     f"{out['z']:+.1f} ({spread(out, 'training rows')})"})
    return flags


def multiway_intervals(step_model: SelectorStepModel, plan: Plan, steps: list[StepPrediction],
                       objective: Objective, model_tasks: dict[str, str | None]) -> dict[str, Any]:
    """Per level: each step's interval on the expert's side (plan.step_utility) and the score's
    bound (SCORE_BOUND), from the selectors' calibrated half-widths per arm. A two-sided selector's
    merge-side value 2 U - V gets the half-width 2 h_U + h_V (h_U where a task-less model joins)."""
    sel, aux = step_model.selector, step_model.aux_selector
    if sel.calibration is None or (aux is not None and aux.calibration is None):
        return {"available": False, "reason": NO_CALIBRATION}
    levels: dict[str, Any] = {}
    ops = plan.operators
    for lv in sel.calibration.levels:
        hu = _halfwidths(sel, ops, lv)
        hv = _halfwidths(aux, ops, lv) if aux is not None else [0.0] * len(ops)
        if hu is None or hv is None:
            continue
        # Per step: 2 h_U + h_V where the merge side is 2 U - V, h_U where it is U (one-sided
        # selector, or a joining model without a task).
        hk = [2 * hu[j] + hv[j] if step_model.two_sided and model_tasks.get(st.model) is not None else hu[j]
              for j, st in enumerate(steps)]
        bounded = []
        for sign in (-1, 1):
            bounded.append([StepPrediction(st.model, st.share, {t: x + sign * hk[j] for t, x in st.kept.items()},
                                           None if st.joining is None else st.joining + sign * hv[j])
                            for j, st in enumerate(steps)])
        expert_in = plan.models[0] == plan.expert
        step_iv = []
        for j, st in enumerate(steps):
            if expert_in:
                step_iv.append(bounds(plan.step_utility[j] - hk[j], plan.step_utility[j] + hk[j]))
            elif st.model == plan.expert:
                step_iv.append(bounds(plan.step_utility[j] - hv[j], plan.step_utility[j] + hv[j]))
                expert_in = True
            else:
                step_iv.append([1.0, 1.0])
        lo, hi = (objective.score(objective.retention(plan.models[0], b, model_tasks), plan.expert)
                  for b in bounded)
        levels[level_key(lv)] = {"steps": step_iv, "score": bounds(lo, hi)}
    return {"available": True, "levels": levels, "score_bound": SCORE_BOUND}


def assess_plan(plan: Plan, step_model: SelectorStepModel, model_tasks: dict[str, str | None],
                objective: Objective, catalog_tasks: dict[str, str | None] | None = None) -> None:
    """Fill a multi-way plan's intervals, flags and expert-alone comparison in place. `model_tasks`
    are the tasks the plan is judged on (a required expert's is the plan's); the flags read the
    catalog's (`catalog_tasks`, default the same), so an expert of another task is named."""
    from simmerge_ray.planner.search import Replayer

    sel = step_model.selector
    steps = Replayer(step_model, plan.task, model_tasks).replay(plan.models, plan.operators, plan.weighting)
    z = sel.standardise(step_model.plan_inputs(plan.models, plan.step_arms(), plan.task))
    plan.intervals = multiway_intervals(step_model, plan, steps, objective, model_tasks)
    plan.flags = input_flags(sel, z, plan.models, catalog_tasks if catalog_tasks is not None else model_tasks,
                             plan.task, plan.expert)
    proxy = sel.meta.get("target") == "utility" and not step_model.two_sided
    plan.expert_alone = expert_alone(sel, objective, plan.score, proxy=proxy)
