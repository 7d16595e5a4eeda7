"""`simmerge fit` and `simmerge evaluate-selector`: train f_plan on Ray, judge it on held-out pairs."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from simmerge_ray.cli.common import init_ray, verdict_line
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.out_checks import check_output
from simmerge_ray.selector.calibration import level_key
from simmerge_ray.selector.data import MIN_LABELLED_PAIRS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="features folder (features.parquet) or a parquet file")
    p.add_argument("--labels", required=True, help="labels.parquet from `simmerge label`")
    p.add_argument("--out", required=True, help="output folder (replaced if simmerge wrote it)")
    p.add_argument("--target", default="utility", choices=["utility", "gap_closed", "aux_gap_closed"],
                   help="label column to predict: the two-sided utility (default), the expert side or the auxiliary side")
    p.add_argument("--tune-samples", type=int, default=8,
                   help="Ray Tune trials of the hyperparameter search (0: no search, the default config)")
    p.add_argument("--epochs", type=int, default=300, help="training epochs (full batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search, the folds and the initial weights")
    p.add_argument("--no-task-encoding", action="store_true", help="task-agnostic selector")
    p.add_argument("--calibration-folds", type=int, default=5,
                   help="folds by model pair whose out-of-fold residuals calibrate the prediction intervals "
                        "(evaluate-selector: inside each outer training part); 0: no intervals")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit", help="fit the selector (Ray Tune search, then Ray Train)",
        description=f"Fit the selector on labelled pairs (rows of labels.parquet). Below {MIN_LABELLED_PAIRS} "
                    f"labelled pairs it warns: too few for the selector to beat a fixed arm reliably.",
        epilog="example:\n  simmerge fit --features feats/ --labels labels/labels.parquet --out selector/")
    _common(p)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.set_defaults(func=run_fit)
    e = subparsers.add_parser(
        "evaluate-selector", help="held-out pairs and leave-one-task-out evaluation, ablation, chart",
        description="Judge the selector on held-out model pairs (grouped folds) and held-out tasks; ends "
                    "with a verdict line: SimMerge against the best fixed arm, by how much.",
        epilog="example:\n  simmerge evaluate-selector --features feats/ --labels labels/labels.parquet "
               "--out selector-eval/")
    _common(e)
    e.add_argument("--folds", type=int, default=5, help="folds over model pairs (at most one per pair)")
    e.set_defaults(func=run_evaluate)


def check_calibration_folds(folds: int) -> None:
    if folds < 0 or folds == 1:
        raise ConfigError(f"--calibration-folds: {folds} is not 0 (no intervals) or at least 2")


def warn_few_pairs(command: str, n: int) -> None:
    """One warning line (stderr) below the documented minimum of labelled pairs."""
    if n < MIN_LABELLED_PAIRS:
        print(f"simmerge {command}: warning: only {n} labelled pairs (fewer than {MIN_LABELLED_PAIRS}): too few to "
              f"trust the selector over a fixed arm; label more experts or tasks", file=sys.stderr)


@contextmanager
def ray_work_dir() -> Iterator[Path]:
    """Ray Tune's and Ray Train's storage for one run: a folder under the cache (never beside
    --out), removed when the run ends."""
    from simmerge_ray.io.digest_cache import cache_root

    root = cache_root() / "ray-work"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="selector-", dir=root))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose_config(data, args: argparse.Namespace, storage: Path):
    """Ray Tune's best config on pair-grouped folds of `data` (or the default one)."""
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.ray_fit import tune_selector

    base = SelectorConfig(epochs=args.epochs, seed=args.seed, task_encoding=not args.no_task_encoding)
    if args.tune_samples <= 0:
        return base, []
    best, trials = tune_selector(data, num_samples=args.tune_samples, folds=3, base=base, storage=storage,
                                 allow_task_encoding=not args.no_task_encoding)
    return best, trials


def run_fit(args: argparse.Namespace) -> int:
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import fixed_fit
    from simmerge_ray.selector.ray_fit import train_with_ray
    from simmerge_ray.selector.uncertainty import add_uncertainty

    check_calibration_folds(args.calibration_folds)
    data = load_pair_data(args.features, args.labels, args.target)
    out = check_output(args.out, overwrite=True, inputs=[args.features, args.labels])
    warn_few_pairs("fit", len(data))
    init_ray(args.address)
    with ray_work_dir() as work:
        cfg, trials = choose_config(data, args, work)
        sel = train_with_ray(data, cfg, num_workers=args.workers, storage=work)
    add_uncertainty(sel, data, fixed_fit(cfg), args.calibration_folds, args.seed)
    sel.meta = {"target": args.target, "rows": len(data), "tune_trials": trials}
    sel.save(out)
    print(f"selector ({args.target}) fitted on {len(data)} pairs, {len(data.feature_names)} features, "
          f"operators {', '.join(data.operators)}; config {asdict(cfg)} -> {out}")
    print(calibration_line(sel))
    return 0


def calibration_line(sel) -> str:
    """What the saved intervals are, in one line."""
    cal = sel.calibration
    if cal is None:
        return "intervals: none (--calibration-folds 0, or fewer than 2 model pairs)"
    widths = ", ".join(f"{level_key(lv)}%: " + ("unbounded for some arm (too few pairs)" if any(map(math.isinf, hw))
                                                else f"+-{min(hw):.3f} to +-{max(hw):.3f}")
                       for lv, hw in zip(cal.levels, cal.halfwidth.tolist()))
    return (f"intervals: per-arm split-conformal from {cal.folds}-fold out-of-fold residuals on {cal.rows} pairs "
            f"({widths})")


def run_evaluate(args: argparse.Namespace) -> int:
    from simmerge_ray.io.atomic import atomic_output_dir
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import ablation, evaluate_loto, evaluate_pairs, fixed_fit, gap_chart
    from simmerge_ray.selector.folds import group_kfold

    check_calibration_folds(args.calibration_folds)
    data = load_pair_data(args.features, args.labels, args.target)
    out = check_output(args.out, overwrite=True, inputs=[args.features, args.labels])
    warn_few_pairs("evaluate-selector", len(data))
    if args.tune_samples > 0:  # the folds themselves are fitted in this process
        init_ray(args.address)
    # Hyperparameters are searched on the first outer fold's training pairs only, never on a
    # test pair of that fold; the other folds reuse that config (documented approximation).
    train_idx, _ = group_kfold(data.pair_keys, args.folds, args.seed)[0]
    with ray_work_dir() as work:
        cfg, trials = choose_config(data.subset(train_idx), args, work)
    report = {
        "config": asdict(cfg),
        "held_out_pairs": evaluate_pairs(data, fixed_fit(cfg), folds=args.folds, seed=args.seed,
                                         calibration_folds=args.calibration_folds),
        "leave_one_task_out": evaluate_loto(data, fixed_fit(replace(cfg, task_encoding=False))),
        "ablation": ablation(data, cfg, folds=args.folds, seed=args.seed),
        "tune_trials": trials,
    }
    with atomic_output_dir(out, overwrite=True, inputs=[args.features, args.labels]) as tmp:
        (tmp / "selector_report.json").write_text(json.dumps(report, indent=2))
        gap_chart(report["held_out_pairs"], tmp / "utility.png", f"{args.target} on held-out pairs")
    print(format_summary(report))
    return 0


def format_summary(report: dict) -> str:
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
    lines.append(f"leave one task out: accuracy {lo['selection_accuracy']:.1%}, SimMerge "
                 f"{100 * lo['utility']['simmerge']['mean']:.1f}% vs best fixed "
                 f"{100 * lo['utility'][lo['best_fixed_operator']]['mean']:.1f}%")
    return "\n".join(lines)
