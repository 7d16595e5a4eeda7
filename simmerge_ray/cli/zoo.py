"""`simmerge zoo build --config ZOO.yaml --out DIR` and `simmerge label --catalog C --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from simmerge_ray.cli.common import init_ray
from simmerge_ray.io.out_checks import check_output


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
        epilog="example:\n  simmerge label --catalog catalog.yaml --out labels/")
    lab.add_argument("--catalog", required=True, help="catalog.yaml with a base and tasks with eval files")
    lab.add_argument("--out", required=True, help="label folder; its cache/ makes reruns resume")
    lab.add_argument("--subsets-3", type=int, default=None,
                     help=f"3-way subsets of experts of distinct tasks, each with all orders x operator sequences "
                          f"(default: {_label_default('subsets_3')})")
    lab.add_argument("--subsets-4", type=int, default=None,
                     help=f"4-way subsets of experts of distinct tasks, each with all orders x each fixed operator "
                          f"(default: {_label_default('subsets_4')})")
    lab.add_argument("--mixed-4", type=int, default=None,
                     help=f"random mixed-operator plans per 4-way subset (default: {_label_default('mixed_4')})")
    lab.add_argument("--workers", type=int, default=None, help=f"evaluator actors (default: {_label_default('workers')})")
    lab.add_argument("--seed", type=int, default=None, help=f"seed of the 3-/4-way subset sampling (default: {_label_default('seed')})")
    lab.add_argument("--metric", choices=["accuracy", "score"], default=None,
                     help="what GapClosed and retention are computed on: answer-token accuracy (default) "
                          "or the smooth likelihood score")
    lab.add_argument("--max-plans", type=int, default=None, help="measure at most this many new plans, then stop (default: all; rerun to resume)")
    lab.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    lab.set_defaults(func=run_label)


def _label_default(field: str) -> object:
    from simmerge_ray.testbed.label_plans import LabelSettings

    return LabelSettings.model_fields[field].default


def run_build(args: argparse.Namespace) -> int:
    from simmerge_ray.testbed.build import build_zoo
    from simmerge_ray.testbed.zoo_config import ZooConfig

    cfg = ZooConfig.load(args.config)
    check_output(args.out, overwrite=args.overwrite, inputs=[args.config])
    init_ray(args.address)
    catalog = build_zoo(cfg, Path(args.out), overwrite=args.overwrite)
    print(f"zoo: {len(cfg.experts())} experts + base -> {catalog}")
    return 0


def _check_eval_files(catalog, tasks: set[str]) -> None:
    """Every eval file readable, each line a prompt and an answer (strings): checked here, since
    in an actor a bad file surfaces as an actor's death long after Ray started."""
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.testbed.evaluate import load_examples

    for task in sorted(tasks):
        path = catalog.tasks[task].eval
        try:
            examples = load_examples(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the eval set of task {task!r} ({e})") from None
        for i, ex in enumerate(examples, start=1):
            if not (isinstance(ex.prompt, str) and isinstance(ex.answer, str) and ex.prompt and ex.answer):
                raise ConfigError(f"{path}: example {i}: 'prompt' and 'answer' must be non-empty strings")


def run_label(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from simmerge_ray.catalog import Catalog
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.testbed.label_plans import LabelSettings
    from simmerge_ray.testbed.labels import check_label_catalog, run_labels

    overrides = {k: v for k, v in (("subsets_3", args.subsets_3), ("subsets_4", args.subsets_4),
                                   ("mixed_4", args.mixed_4), ("workers", args.workers), ("seed", args.seed),
                                   ("metric", args.metric))
                 if v is not None}
    try:
        settings = LabelSettings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    catalog = Catalog.load(args.catalog)
    _check_eval_files(catalog, set(check_label_catalog(catalog).values()))  # fail before starting Ray
    init_ray(args.address)
    rep = run_labels(Path(args.catalog), Path(args.out), settings, max_plans=args.max_plans)
    state = "complete: tables written" if rep.complete else "incomplete: rerun to resume"
    print(f"label: {rep.computed} measured, {rep.cached} cached of {rep.total} plans in {rep.seconds:.0f}s ({state}) -> {rep.out}")
    if rep.complete:
        import json

        info = json.loads((rep.out / "label_summary.json").read_text())
        dropped = info["dropped_2way_small_gap"]
        print(f"labels: {info['labels_2way']} labelled pairs"
              + (f" ({dropped} dropped: the expert's and the auxiliary's scores differ by less than "
                 f"{info['gap_epsilon']:g}, so GapClosed is undefined)" if dropped else "")
              + f"; {info['labels_3way']} 3-way and {info['labels_4way']} 4-way plans")
    return 0
