"""Judging the selector on pairs it never saw: accuracy, utility per task, regret.

Every evaluation is out-of-fold: outer folds split by model pair (or leave one task out);
hyperparameters, when searched, are searched on the outer training part only (nested), so no
test pair influences its own prediction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.features.schema import FUNCTIONAL_PREFIX, STRUCTURAL_PREFIX
from simmerge_ray.merge.arms import PAPER_ARMS
from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.folds import group_kfold, leave_one_task_out
from simmerge_ray.selector.model import Selector, SelectorConfig
from simmerge_ray.selector.oof import FitFn, out_of_fold
from simmerge_ray.selector.train import fit_selector
from simmerge_ray.selector.uncertainty import held_out_coverage

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _per_task(values: dict[str, np.ndarray], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Mean per task, and 'mean' as the unweighted mean of the task means."""
    names = sorted(set(tasks))
    t_arr = np.asarray(tasks)
    out = {}
    for m, v in values.items():
        per = {t: float(v[t_arr == t].mean()) for t in names}
        out[m] = per | {"mean": float(np.mean(list(per.values())))}
    return out


def summarize(data: PairData, pred: np.ndarray, majority: list[str] | None) -> dict:
    """Selection accuracy, utility per task and method, and regret (`majority`: the
    majority-class rule's operator per row, None where there is no training part to take it from).

    Beside a two-sided target, `gap_closed` gives the paper's one-sided GapClosed of its three
    arms, of their oracle, and of the arm SimMerge picked."""
    ops = data.operators
    rows = np.arange(len(data))
    pick = pred.argmax(axis=1)
    chosen = data.y[rows, pick]
    oracle = data.y.max(axis=1)
    methods = {"simmerge": chosen, "oracle": oracle}
    if majority is not None:
        methods["majority"] = data.y[rows, [ops.index(m) for m in majority]]
    methods |= {o: data.y[:, j] for j, o in enumerate(ops)}
    util = _per_task(methods, data.tasks)
    correct = chosen >= oracle - 1e-9
    best_fixed = max(ops, key=lambda o: util[o]["mean"])
    oracle_op = [ops[i] for i in data.y.argmax(axis=1)]
    out = {
        "n": len(data),
        "selection_accuracy": float(correct.mean()),
        "selection_accuracy_by_best_operator": {o: float(correct[np.asarray(oracle_op) == o].mean())
                                                for o in ops if o in oracle_op},
        "oracle_operator_share": {o: oracle_op.count(o) / len(data) for o in ops},
        "utility": util,
        "regret": {m: float((oracle - v).mean()) for m, v in methods.items()},
        "best_fixed_operator": best_fixed,
        "simmerge_vs_best_fixed": util["simmerge"]["mean"] - util[best_fixed]["mean"],
        "simmerge_share_of_oracle": util["simmerge"]["mean"] / util["oracle"]["mean"] if util["oracle"]["mean"] else None,
        "headroom_share": ((util["simmerge"]["mean"] - util[best_fixed]["mean"])
                           / (util["oracle"]["mean"] - util[best_fixed]["mean"])
                           if util["oracle"]["mean"] > util[best_fixed]["mean"] else None),
    }
    if data.gap is not None:
        paper = [j for j, o in enumerate(ops) if o in PAPER_ARMS]
        one_sided = {"simmerge": data.gap[rows, pick], "oracle": data.gap[:, paper].max(axis=1)} | {
            ops[j]: data.gap[:, j] for j in paper}
        out["gap_closed"] = _per_task(one_sided, data.tasks)
    return out


def evaluate_pairs(data: PairData, fit: FitFn | Sequence[FitFn], *, folds: int = 5, seed: int = 0,
                   calibration_folds: int = 0) -> dict:
    """Held-out pairs (`fit`: one for every fold, or one per fold of group_kfold(data.pair_keys,
    folds, seed), e.g. with hyperparameters searched on that fold's training pairs); with
    `calibration_folds` > 0 also the measured coverage of the intervals (calibrated inside each
    outer training part, as `fit` calibrates on all pairs)."""
    splits = group_kfold(data.pair_keys, folds, seed)
    pred, maj = out_of_fold(data, splits, fit)
    out = {"split": f"{len(splits)}-fold by unordered model pair", **summarize(data, pred, maj)}
    if calibration_folds > 0:
        out["intervals"] = held_out_coverage(data, splits, pred, fit, calibration_folds, seed)
    return out


def evaluate_loto(data: PairData, fit: FitFn | Sequence[FitFn]) -> dict:
    """Leave one task out (`fit`: one for every task, or one per task in sorted order): the
    held-out task is new, so its task code is unknown (zeros)."""
    splits = leave_one_task_out(data.tasks, data.aux_tasks)
    pred, maj = out_of_fold(data, list(splits.values()), fit)
    return {"split": "leave one task out: trained on pairs with the task on neither side", **summarize(data, pred, maj)}


def check_transferable(sel: Selector, where: Path) -> None:
    """Transfer judges the two-sided utility: a selector fitted on another target (RUN/selector_aux,
    `fit --target gap_closed`) predicts another quantity, and its picks were scored as if it did not."""
    target = sel.meta.get("target", "utility")
    if target != "utility":
        raise ConfigError(f"{where}: a selector of target {target!r}; transfer judges the two-sided utility: "
                          f"pass one fitted with --target utility (e.g. RUN/selector, not RUN/selector_aux)")


def evaluate_transfer(sel: Selector, data: PairData) -> dict:
    """A fitted selector judged, unchanged, on another zoo's pairs (no retraining).

    The target table must hold every feature of the selector's schema (a column undefined in all
    its rows, e.g. measured on the auxiliary's task where no auxiliary has one, is imputed), and
    its operators must be ones the selector predicts; an unknown task gets no task code, as in
    leave-one-task-out.
    """
    sel.check_schema([*data.feature_names, *data.undefined_features], "target feature table")
    unknown = [o for o in data.operators if o not in sel.operators]
    if unknown:
        raise ConfigError(f"target labels have operators the selector does not predict: {', '.join(unknown)}")
    data = data.select_features(sel.feature_names)
    pred_all = sel.predict(data.x, data.tasks)
    pred = pred_all[:, [sel.operators.index(o) for o in data.operators]]
    out = {"split": "transfer: selector fitted on another zoo, applied unchanged", **summarize(data, pred, None)}
    if sel.domain is not None:
        out["outside_training_domain"] = outside_domain(sel, data)
    return out


def outside_domain(sel: Selector, data: PairData) -> dict:
    """How many of `data`'s rows lie outside the selector's training domain (a standardised
    feature beyond what 99% of training rows stay within): where a transferred selector
    extrapolates, before any label says how well it does."""
    z = sel.standardise(data.x)
    flagged = [o for o in (sel.domain.outlier(row) for row in z) if o is not None]
    return {"rows": len(z), "outside": len(flagged), "share": len(flagged) / len(z) if len(z) else 0.0,
            "threshold": sel.domain.max_abs_z,
            "most_extreme_feature": dict(Counter(o["feature"] for o in flagged).most_common(5))}


def fixed_fit(cfg: SelectorConfig) -> FitFn:
    return lambda train: fit_selector(train, cfg)


Configs = SelectorConfig | Sequence[SelectorConfig]  # one for every fold, or one per fold
T = TypeVar("T")


def _each(cfg: Configs, f: Callable[[SelectorConfig], T]) -> T | list[T]:
    """`f` of the one config, or of each fold's."""
    return f(cfg) if isinstance(cfg, SelectorConfig) else [f(c) for c in cfg]


def ablation(data: PairData, cfg: Configs, *, folds: int = 5, seed: int = 0) -> dict[str, dict]:
    """The same folds with all features, functional only, structural only, and no task code."""
    no_task = _each(cfg, lambda c: replace(c, task_encoding=False))
    variants: dict[str, tuple[PairData, Configs]] = {"all features": (data, cfg)}
    func = [n for n in data.feature_names if n.startswith(FUNCTIONAL_PREFIX)]
    struct = [n for n in data.feature_names if n.startswith(STRUCTURAL_PREFIX)]
    if func:
        variants["functional only"] = (data.select_features(func), cfg)
    if struct:
        variants["structural only"] = (data.select_features(struct), cfg)
    variants["no task encoding"] = (data, no_task)
    out = {}
    for name, (d, c) in variants.items():
        r = evaluate_pairs(d, _each(c, fixed_fit), folds=folds, seed=seed)
        out[name] = {"selection_accuracy": r["selection_accuracy"], "utility_mean": r["utility"]["simmerge"]["mean"],
                     "regret": r["regret"]["simmerge"], "features": len(d.feature_names)}
    return out


def gap_figure(report: dict, title: str) -> Figure:
    """Bar chart of the utility per task: SimMerge, the paper's arms, the best fixed arm, the
    majority rule and the oracle (the paper's Figure 2 layout); the legend beside the axes."""
    from simmerge_ray.report.charts import grouped_bars_figure

    gap = report["utility"]
    shown = ("simmerge", *PAPER_ARMS, report["best_fixed_operator"], "majority", "oracle")
    methods = [m for m in dict.fromkeys(shown) if m in gap]
    tasks = [t for t in gap["simmerge"] if t != "mean"] + ["mean"]
    return grouped_bars_figure({t: {m: gap[m][t] for m in methods} for t in tasks}, "utility (%)", title)


def gap_chart(report: dict, path: Path, title: str) -> Path:
    """`gap_figure`, saved as a PNG at `path` (utility.png; gap_closed.png before the
    two-sided utility)."""
    from simmerge_ray.report.charts import save_figure

    return save_figure(gap_figure(report, title), path)
