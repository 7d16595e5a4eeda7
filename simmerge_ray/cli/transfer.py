"""`simmerge transfer`: a fitted selector applied, unchanged, to the zoo of a larger model.

The paper fits f_plan on 7B checkpoints and applies it to 111B ones. Here: build the target
zoo and its pairwise labels with the pipeline's own stages (reused when already done), apply
the source selector with no retraining, and compare it with the target's fixed operators, its
oracle and, for reference, a selector fitted on the target zoo itself (held-out pairs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simmerge_ray.cli.common import at_least_two, at_least_zero, seed, verdict_line
from simmerge_ray.merge.arms import ARM_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transfer", help="apply a fitted selector unchanged to another zoo and judge it",
                              epilog="example:\n  simmerge transfer --selector runs/demo/selector "
                                     "--zoo-config configs/zoo_large.yaml --out runs/transfer")
    p.add_argument("--selector", required=True, help="selector folder fitted on the source zoo (e.g. runs/demo/selector)")
    p.add_argument("--zoo-config", "--config", dest="zoo_config", required=True,
                   help="the target zoo's YAML (e.g. configs/zoo_large.yaml)")
    p.add_argument("--out", required=True, help="run folder for the target zoo (finished stages are reused)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the in-zoo reference (a selector fitted and judged on the target zoo)")
    p.add_argument("--tune-samples", type=at_least_zero, default=6, help="Ray Tune trials of the in-zoo reference")
    p.add_argument("--folds", type=at_least_two, default=5, help="folds over model pairs of the in-zoo reference")
    p.add_argument("--seed", type=seed, default=0, help="seed of every stage")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.io.atomic import atomic_output_dir
    from simmerge_ray.io.out_checks import check_not_input, check_output
    from simmerge_ray.pipeline import PipelineSettings, RunLayout
    from simmerge_ray.pipeline import run as run_pipeline
    from simmerge_ray.ray_session import init_ray
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.evaluate import check_transferable, evaluate_transfer, gap_chart
    from simmerge_ray.selector.model import Selector
    from simmerge_ray.testbed.label_plans import LabelSettings
    from simmerge_ray.testbed.zoo_config import ZooConfig

    sel = Selector.load(args.selector)  # fail on a bad folder, config or option before hours of zoo building
    check_transferable(sel, Path(args.selector))
    ZooConfig.load(args.zoo_config)
    out = Path(args.out).resolve()
    layout = RunLayout(out)
    inputs = [args.selector, args.zoo_config]
    # A run folder holding the source selector (--out runs/demo, --selector runs/demo/selector) is the
    # source run: its stages were rebuilt from the target config, or with the same config reused, the
    # selector then "transferred" to the pairs it was fitted on.
    check_not_input(out, [args.selector])
    check_output(layout.transfer, overwrite=True, inputs=inputs)
    init_ray(args.address)
    # Pairwise labels only: the multi-way labels are not needed to judge a pairwise selector.
    settings = PipelineSettings(Path(args.zoo_config).resolve(), out, tune_samples=args.tune_samples,
                                folds=args.folds, seed=args.seed,
                                labels=LabelSettings(subsets_3=0, subsets_4=0, mixed_4=0))
    timings = run_pipeline(settings, until="labels" if args.no_reference else "selector_eval")
    data = load_pair_data(layout.features, layout.pair_labels)
    report = {
        "source_selector": str(Path(args.selector).resolve()),
        "source_rows": sel.meta.get("rows"),
        "target_zoo_config": str(settings.zoo_config),
        "transfer": evaluate_transfer(sel, data),
        "timings": timings,
    }
    if not args.no_reference and layout.selector_report.exists():
        report["in_zoo"] = json.loads(layout.selector_report.read_text())["held_out_pairs"]
    with atomic_output_dir(layout.transfer, overwrite=True, inputs=inputs) as tmp:
        (tmp / "transfer.json").write_text(json.dumps(report, indent=2))
        gap_chart(report["transfer"], tmp / "utility_transfer.png",
                  "utility on the target zoo, selector fitted on the source zoo")
    print(format_transfer(report))
    return 0


def format_transfer(report: dict) -> str:
    """Per-task utility of the transferred selector, the fixed arms, the oracle (and the in-zoo
    reference), plus accuracy and share of the oracle."""
    t = report["transfer"]
    g = t["utility"]
    tasks = [k for k in g["simmerge"] if k != "mean"] + ["mean"]
    rows = [("SimMerge (transferred)", g["simmerge"])]
    if "in_zoo" in report:
        rows.append(("SimMerge (fitted here)", report["in_zoo"]["utility"]["simmerge"]))
    rows += [(m, g[m]) for m in (*ARM_NAMES, "oracle") if m in g]
    lines = [f"transfer to {report['target_zoo_config']} (n={t['n']} pairs): selection accuracy "
             f"{t['selection_accuracy']:.1%}, {100 * (t['simmerge_share_of_oracle'] or 0):.0f}% of the oracle, "
             f"{100 * t['simmerge_vs_best_fixed']:+.1f} points vs the best fixed arm ({t['best_fixed_operator']})",
             f"{'utility %':<24}" + "".join(f"{k:>13}" for k in tasks)]
    lines += [f"{name:<24}" + "".join(f"{100 * v[k]:>13.1f}" for k in tasks) for name, v in rows]
    lines.append(verdict_line(t["simmerge_vs_best_fixed"], t["best_fixed_operator"], t["simmerge_share_of_oracle"],
                              " on the target zoo, without retraining"))
    if "outside_training_domain" in t:
        d = t["outside_training_domain"]
        lines.append(f"outside the selector's training domain: {d['outside']} of {d['rows']} target pairs "
                     f"({d['share']:.0%}; largest |z| beyond {d['threshold']:.1f})")
    if "in_zoo" in report:
        lines.append(f"in-zoo reference: selection accuracy {report['in_zoo']['selection_accuracy']:.1%} "
                     f"({report['in_zoo']['split']})")
    return "\n".join(lines)
