"""`simmerge fit` and `simmerge evaluate-selector`: train f_plan on Ray, judge it on held-out pairs
(simmerge_ray/pipeline/selector.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.cli.common import at_least_one, at_least_two, at_least_zero, seed
from simmerge_ray.selector.data import MIN_LABELLED_PAIRS

if TYPE_CHECKING:
    from simmerge_ray.pipeline.selector import SelectorSettings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="features folder (features.parquet) or a parquet file")
    p.add_argument("--labels", required=True, help="labels.parquet from `simmerge label`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    p.add_argument("--target", default="utility", choices=["utility", "gap_closed", "aux_gap_closed"],
                   help="label column to predict: the two-sided utility (default), the expert side or the auxiliary side")
    p.add_argument("--tune-samples", type=at_least_zero, default=8,
                   help="Ray Tune trials of the hyperparameter search (0: no search, the built-in config); "
                        "evaluate-selector searches once per fold, on that fold's training pairs")
    p.add_argument("--epochs", type=at_least_one, default=300, help="training epochs (full batch)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the search, the folds and the initial weights")
    p.add_argument("--no-task-encoding", action="store_true", help="task-agnostic selector")
    p.add_argument("--members", type=int, default=1,
                   help="networks averaged into one selector, their initial weights drawn one after another "
                        "from --seed (an ensemble: steadier picks; the search runs on single networks) (default: 1)")
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
    p.add_argument("--workers", type=at_least_one, default=1, help="Ray Train workers")
    p.set_defaults(func=run_fit)
    e = subparsers.add_parser(
        "evaluate-selector", help="held-out pairs and leave-one-task-out evaluation, ablation, chart",
        description="Judge the selector on held-out model pairs (grouped folds, each with its own "
                    "hyperparameter search on its training pairs) and held-out tasks; ends with a verdict "
                    "line: SimMerge against the best fixed arm, by how much.",
        epilog="example:\n  simmerge evaluate-selector --features feats/ --labels labels/labels.parquet "
               "--out selector-eval/")
    _common(e)
    e.add_argument("--folds", type=at_least_two, default=5, help="folds over model pairs (at most one per pair)")
    e.set_defaults(func=run_evaluate)


def _settings(args: argparse.Namespace) -> SelectorSettings:
    from simmerge_ray.pipeline.selector import SelectorSettings

    return SelectorSettings(Path(args.features), Path(args.labels), Path(args.out), target=args.target,
                            tune_samples=args.tune_samples, epochs=args.epochs, seed=args.seed,
                            task_encoding=not args.no_task_encoding, calibration_folds=args.calibration_folds,
                            members=args.members, address=args.address, overwrite=args.overwrite)


def run_fit(args: argparse.Namespace) -> int:
    from simmerge_ray.pipeline.selector import fit

    fit(_settings(args), workers=args.workers)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from simmerge_ray.pipeline.selector import evaluate

    evaluate(_settings(args), folds=args.folds)
    return 0
