"""`simmerge zoo build --config ZOO.yaml --out DIR` and `simmerge label --catalog C --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path
from shlex import quote

from simmerge_ray.cli.common import at_least_one, at_least_zero, name_listing, seed


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the testbed: train a zoo of small domain experts")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    b = zoo_sub.add_parser("build", help="pretrain a base and fine-tune experts; write a catalog",
                           epilog="example:\n  simmerge zoo build --config configs/zoo_tiny.yaml --out runs/tiny-zoo/")
    b.add_argument("--config", required=True, help="zoo YAML (e.g. configs/zoo_default.yaml)")
    b.add_argument("--out", required=True, help="output folder (catalog.yaml, checkpoints/, data/)")
    b.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    b.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    b.set_defaults(func=run_build)

    lab = subparsers.add_parser(
        "label", help="merge and evaluate 2/3/4-way merges of a catalog (ground truth)",
        description="Merge every expert pair of different tasks with every arm, and sampled 3-/4-way plans, "
                    "and score each merge on the tasks' eval files (JSON lines, one {\"prompt\": ..., "
                    "\"answer\": ...} per line; the answer is what the model must continue the prompt "
                    "with). Needs a catalog with a base and an eval file for every expert's task.",
        epilog=f"arms (simmerge_ray/merge/arms.py), each pair merged with every one:\n{_arms_text()}\n\n"
               f"fold weightings of 3-/4-way plans (--weightings):\n{_weightings_text()}\n\n"
               "example:\n  simmerge label --catalog catalog.yaml --out labels/")
    lab.add_argument("--catalog", required=True, help="catalog.yaml with a base and tasks with eval files")
    lab.add_argument("--out", required=True, help="label folder; its cache/ makes reruns resume")
    lab.add_argument("--subsets-3", type=int, default=None,
                     help=f"3-way subsets of experts of distinct tasks, each with all orders x weightings x step-arm "
                          f"sequences (default: {_label_default('subsets_3')})")
    lab.add_argument("--subsets-4", type=int, default=None,
                     help=f"4-way subsets of experts of distinct tasks, each with --orders-4 orders x weightings x "
                          f"step-arm sequences (default: {_label_default('subsets_4')})")
    lab.add_argument("--mixed-3", type=int, default=None,
                     help=f"random mixed step-arm sequences per 3-way subset, beside one per step arm "
                          f"(default: {_label_default('mixed_3')})")
    lab.add_argument("--mixed-4", type=int, default=None,
                     help=f"random mixed step-arm sequences per 4-way subset, beside one per step arm "
                          f"(default: {_label_default('mixed_4')})")
    lab.add_argument("--orders-4", type=int, default=None,
                     help=f"random orders per 4-way subset, of 24 (default: {_label_default('orders_4')})")
    lab.add_argument("--weightings", nargs="+", default=None,
                     help=f"fold weightings of the 3-/4-way plans (default: {' '.join(_label_default('weightings'))})")
    lab.add_argument("--workers", type=at_least_one, default=None,
                     help=f"evaluator actors (default: SIMMERGE_MAX_ACTORS, else {_label_default('workers')}; "
                          f"either is cut to what the cluster holds)")
    lab.add_argument("--seed", type=seed, default=None, help=f"seed of the 3-/4-way subset sampling (default: {_label_default('seed')})")
    lab.add_argument("--metric", choices=["accuracy", "score"], default=None,
                     help="what GapClosed and retention are computed on: answer-token accuracy (default) "
                          "or the smooth likelihood score")
    lab.add_argument("--max-plans", type=at_least_zero, default=None, help="measure at most this many new plans, then stop (default: all; rerun to resume)")
    lab.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    lab.set_defaults(func=run_label)


def _arms_text() -> str:
    from simmerge_ray.merge.arms import ARMS

    return name_listing([(a.name, f"{a.doc} (method {a.method}{'; a paper arm' if a.paper else ''})") for a in ARMS])


def _weightings_text() -> str:
    from simmerge_ray.merge.arms import WEIGHTINGS

    return name_listing([(w.name, w.doc) for w in WEIGHTINGS])


def _label_default(field: str) -> object:
    from simmerge_ray.testbed.label_plans import LabelSettings

    return LabelSettings.model_fields[field].default


def run_build(args: argparse.Namespace) -> int:
    from simmerge_ray.pipeline.zoo import build

    catalog = build(Path(args.config), Path(args.out), overwrite=args.overwrite, address=args.address)
    print(f"next: simmerge features structural --catalog {quote(str(catalog))} --out feats/")
    return 0


def run_label(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from simmerge_ray.errors import ConfigError
    from simmerge_ray.pipeline.zoo import label
    from simmerge_ray.testbed.label_plans import LabelSettings

    overrides = {k: v for k, v in (("subsets_3", args.subsets_3), ("subsets_4", args.subsets_4),
                                   ("mixed_3", args.mixed_3), ("mixed_4", args.mixed_4), ("orders_4", args.orders_4),
                                   ("weightings", args.weightings and tuple(args.weightings)),
                                   ("workers", args.workers), ("seed", args.seed), ("metric", args.metric))
                 if v is not None}
    try:
        settings = LabelSettings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    label(Path(args.catalog), Path(args.out), settings, max_plans=args.max_plans, address=args.address)
    return 0
