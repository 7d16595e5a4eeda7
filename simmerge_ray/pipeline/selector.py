"""The selector stages: fit f_plan (Ray Tune search, then Ray Train) and judge it on held-out
pairs and tasks. `simmerge fit` and `simmerge evaluate-selector` run these, and so does the
pipeline."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.out_checks import check_output
from simmerge_ray.ray_session import init_ray
from simmerge_ray.report.verdict import verdict_line
from simmerge_ray.selector.calibration import level_key
from simmerge_ray.selector.data import MIN_LABELLED_PAIRS, few_pairs_text

if TYPE_CHECKING:  # torch and Ray: imported when a stage runs, not with the command line
    from simmerge_ray.selector.data import PairData
    from simmerge_ray.selector.model import Selector, SelectorConfig

Target = Literal["utility", "gap_closed", "aux_gap_closed"]


@dataclass(frozen=True)
class SelectorSettings:
    """What both selector stages read, write and search (the commands' shared flags)."""

    features: Path  # features folder (features.parquet) or a parquet file
    labels: Path  # labels.parquet
    out: Path
    target: Target = "utility"  # the label column predicted
    tune_samples: int = 8  # Ray Tune trials (0: no search, the default config)
    epochs: int = 300
    seed: int = 0  # of the search, the folds and the initial weights
    task_encoding: bool = True
    calibration_folds: int = 5  # folds of the interval calibration; 0: no intervals
    members: int = 1  # networks averaged into the selector (an ensemble); the search uses one
    address: str | None = None  # Ray address (default: RAY_ADDRESS or a local Ray)
    # replace an `out` that simmerge wrote (`--overwrite`; the pipeline's stages replace their own)
    overwrite: bool = False


LOTO_NEEDS = ("not evaluated: holding a task out leaves no training pair without it on either side "
              "(it takes three tasks or more, with pairs between the others)")


def loto_evaluated(loto: dict) -> bool:
    """Whether a `leave_one_task_out` entry holds results; else it is {"available": False, "reason"}."""
    return loto.get("available") is not False


def check_calibration_folds(folds: int) -> None:
    if folds < 0 or folds == 1:
        raise ConfigError(f"--calibration-folds: {folds} is not 0 (no intervals) or at least 2")


def check_members(members: int) -> None:
    if members < 1:
        raise ConfigError(f"--members: {members} is not at least 1 (networks averaged into the selector)")


def check_learnable(data: PairData, labels: Path, target: str) -> None:
    """Labels a selector can learn a choice from: two arms or more, differing on some pair. With
    one arm, or every arm tied on every pair (a label run that scored nothing), a selector was
    fitted and judged "level with the best fixed arm" without a word that there was no choice."""
    import numpy as np

    if len(data.operators) < 2:
        raise ConfigError(f"{labels}: column 'operator' holds one arm ({data.operators[0]!r}): nothing for the "
                          f"selector to choose between; label two arms or more")
    if not np.any(np.ptp(data.y, axis=1) > 0):
        raise ConfigError(f"{labels}: column {target!r}: every arm scores the same on each of the {len(data)} "
                          f"labelled pairs: nothing to choose between (check the label run)")


def check_pairs_to_hold_out(data: PairData, labels: Path) -> None:
    """Held-out evaluation needs two model pairs (was: "need at least 2 distinct groups", naming
    no file)."""
    keys = sorted(set(data.pair_keys))
    if len(keys) < 2:
        raise ConfigError(f"{labels}: labels of one model pair ({keys[0].replace('|', ', ')}): evaluate-selector "
                          f"holds pairs out, so it needs two or more")


_warned_few: set[tuple[str, int]] = set()  # (labels file, pairs) this process has warned about


def warn_few_pairs(command: str, n: int, labels: str | Path) -> None:
    """One warning line (stderr) below the documented minimum of labelled pairs, once per labels
    file and count in a process: a demo's selector evaluation and its two fits read the same
    labels, and said it three times."""
    key = (os.path.realpath(labels), n)
    if n < MIN_LABELLED_PAIRS and key not in _warned_few:
        _warned_few.add(key)
        print(f"simmerge {command}: warning: {few_pairs_text(n)}", file=sys.stderr)


@contextmanager
def ray_work_dir() -> Iterator[Path]:
    """Ray Tune's and Ray Train's storage for one run: a folder under the cache (never beside
    the output), removed when the run ends."""
    from simmerge_ray.io.digest_cache import cache_root

    root = cache_root() / "ray-work"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="selector-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose_config(data: PairData, s: SelectorSettings, storage: Path, *, by_task: bool = False
                  ) -> tuple[SelectorConfig, list[dict]]:
    """Ray Tune's best config on pair-grouped folds of `data` (task-grouped with `by_task`, where
    `data` holds at least 3 tasks: a fold trains on the pairs with none of its held-out tasks on
    either side), or the default one, and its trials."""
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.ray_fit import tune_selector

    base = SelectorConfig(epochs=s.epochs, seed=s.seed, task_encoding=s.task_encoding, members=s.members)
    if s.tune_samples <= 0:
        return base, []
    return tune_selector(data, num_samples=s.tune_samples, folds=3, base=base, storage=storage,
                         allow_task_encoding=s.task_encoding, by_task=by_task and len(set(data.tasks)) > 2)


def fit(s: SelectorSettings, *, workers: int = 1, echo: Callable[[str], None] = print) -> Selector:
    """Search a config, train on every labelled pair with `workers` Ray Train workers, calibrate
    the intervals, and save the selector to s.out."""
    return fit_many([s], workers=workers, echo=echo)[0]


def fit_many(settings: list[SelectorSettings], *, workers: int = 1,
             echo: Callable[[str], None] = print) -> list[Selector]:
    """`fit` for several selectors (the pipeline's utility and auxiliary ones): every input and
    output is checked first, each target gets its own search, and one Ray Train run trains them
    all (a run's worker group takes longer to start than a small selector takes to train)."""
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import fixed_fit
    from simmerge_ray.selector.ray_fit import check_train_workers, train_with_ray
    from simmerge_ray.selector.uncertainty import add_uncertainty

    inputs = []
    for s in settings:
        check_calibration_folds(s.calibration_folds)
        check_members(s.members)
        data = load_pair_data(s.features, s.labels, s.target)
        check_learnable(data, s.labels, s.target)
        inputs.append((data, check_output(s.out, overwrite=s.overwrite, inputs=[s.features, s.labels])))
        warn_few_pairs("fit", len(data), s.labels)
    init_ray(settings[0].address)
    check_train_workers(workers)  # before the search, not after it
    with ray_work_dir() as work:
        chosen = [choose_config(data, s, work) for s, (data, _) in zip(settings, inputs)]
        sels = train_with_ray([(data, cfg) for (data, _), (cfg, _) in zip(inputs, chosen)], num_workers=workers,
                              storage=work)
    for s, (data, out), (cfg, trials), sel in zip(settings, inputs, chosen, sels):
        add_uncertainty(sel, data, fixed_fit(cfg), s.calibration_folds, s.seed)
        sel.meta = {"target": s.target, "rows": len(data), "tune_trials": trials}
        sel.save(out, overwrite=s.overwrite)
        echo(f"selector ({s.target}) fitted on {len(data)} pairs, {len(data.feature_names)} features, "
             f"arms {', '.join(data.operators)}; config {asdict(cfg)} -> {out}")
        echo(calibration_line(sel))
    return sels


def calibration_line(sel: Selector) -> str:
    """What the saved intervals are, in one line."""
    cal = sel.calibration
    if cal is None:
        return "intervals: none (--calibration-folds 0, or fewer than 2 model pairs)"
    widths = ", ".join(f"{level_key(lv)}%: " + ("unbounded for some arm (too few pairs)" if any(map(math.isinf, hw))
                                                else f"+-{min(hw):.3f} to +-{max(hw):.3f}")
                       for lv, hw in zip(cal.levels, cal.halfwidth.tolist()))
    return (f"intervals: per-arm split-conformal from {cal.folds}-fold out-of-fold residuals on {cal.rows} pairs "
            f"({widths})")


def evaluate(s: SelectorSettings, *, folds: int = 5, echo: Callable[[str], None] = print) -> dict:
    """Held-out pairs (`folds` grouped by pair), leave-one-task-out and the feature ablation:
    s.out/selector_report.json and utility.png; returns the report."""
    from simmerge_ray.io.atomic import atomic_output_dir
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import ablation, evaluate_loto, evaluate_pairs, fixed_fit, gap_chart
    from simmerge_ray.selector.folds import check_folds, group_kfold, leave_one_task_out

    check_folds(folds)
    check_calibration_folds(s.calibration_folds)
    check_members(s.members)
    data = load_pair_data(s.features, s.labels, s.target)
    check_learnable(data, s.labels, s.target)
    check_pairs_to_hold_out(data, s.labels)
    out = check_output(s.out, overwrite=s.overwrite, inputs=[s.features, s.labels])
    warn_few_pairs("evaluate-selector", len(data), s.labels)
    if s.tune_samples > 0:  # the folds themselves are fitted in this process
        init_ray(s.address)
    # Nested: each outer fold's hyperparameters are searched on its training pairs only, so no
    # test pair influences the config it is predicted with, and the estimate averages over one
    # search per fold instead of resting on a single search's noisy pick. Leave-one-task-out is
    # nested the same way: each held-out task's config is searched on the pairs without that task
    # on either side, on inner folds that hold tasks out too (pair folds where only 2 tasks are
    # left), without task codes (the held-out task has none).
    splits = group_kfold(data.pair_keys, folds, s.seed)
    loto_splits = list(leave_one_task_out(data.tasks, data.aux_tasks).values())
    if any(len(tr) == 0 for tr, _ in loto_splits):  # two tasks: every pair has the held-out one on a side
        loto_splits = []
    with ray_work_dir() as work:
        searched = [choose_config(data.subset(tr), s, work) for tr, _ in splits]
        loto_searched = [choose_config(data.subset(tr), replace(s, task_encoding=False), work, by_task=True)
                         for tr, _ in loto_splits]
    cfgs = [cfg for cfg, _ in searched]
    loto_cfgs = [cfg for cfg, _ in loto_searched]
    report = {
        "config": asdict(cfgs[0]),
        "fold_configs": [asdict(c) for c in cfgs],
        "held_out_pairs": evaluate_pairs(data, [fixed_fit(c) for c in cfgs], folds=folds, seed=s.seed,
                                         calibration_folds=s.calibration_folds),
        "leave_one_task_out": (evaluate_loto(data, [fixed_fit(c) for c in loto_cfgs]) if loto_splits else
                               {"available": False, "reason": LOTO_NEEDS}),
        "leave_one_task_out_configs": [asdict(c) for c in loto_cfgs],
        "ablation": ablation(data, cfgs, folds=folds, seed=s.seed),
        "tune_trials": [t for _, trials in searched for t in trials],
        "leave_one_task_out_trials": [trials for _, trials in loto_searched],
    }
    with atomic_output_dir(out, overwrite=s.overwrite, inputs=[s.features, s.labels]) as tmp:
        (tmp / "selector_report.json").write_text(json.dumps(report, indent=2))
        gap_chart(report["held_out_pairs"], tmp / "utility.png", f"{s.target} on held-out pairs")
    echo(format_summary(report))
    return report


def format_summary(report: dict) -> str:
    """The evaluation's table of utility per method and task, its verdict, coverage and LOTO lines."""
    from simmerge_ray.merge.arms import ARM_NAMES

    r = report["held_out_pairs"]
    g = r["utility"]
    methods = [m for m in ("simmerge", *ARM_NAMES, "majority", "oracle") if m in g]
    methods += [m for m in g if m not in methods]
    tasks = list(g["simmerge"])
    width = max(len(m) for m in methods) + 2
    lines = [f"held-out pairs ({r['split']}, n={r['n']}): selection accuracy {r['selection_accuracy']:.1%}",
             "method".ljust(width) + "".join(f"{t:>14}" for t in tasks)]
    for m in methods:
        lines.append(m.ljust(width) + "".join(f"{100 * g[m][t]:>13.1f}%" for t in tasks))
    lines.append(verdict_line(r["simmerge_vs_best_fixed"], r["best_fixed_operator"], r["simmerge_share_of_oracle"]))
    if "intervals" in r:
        cov = r["intervals"]["levels"]
        lines.append(f"interval coverage on held-out pairs ({r['intervals']['rows']} pairs x {r['intervals']['arms']} "
                     "arms): " + ", ".join(f"nominal {k}%: {100 * c['all_arms']:.1f}% (picked arm "
                                           f"{100 * c['picked_arm']:.1f}%)" for k, c in cov.items()))
    lo = report["leave_one_task_out"]
    lines.append(f"leave one task out: {lo['reason']}" if not loto_evaluated(lo) else
                 f"leave one task out: accuracy {lo['selection_accuracy']:.1%}, SimMerge "
                 f"{100 * lo['utility']['simmerge']['mean']:.1f}% vs best fixed "
                 f"{100 * lo['utility'][lo['best_fixed_operator']]['mean']:.1f}%")
    return "\n".join(lines)
