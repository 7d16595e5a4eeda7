"""`simmerge demo` / `simmerge pipeline`: the whole pipeline on a testbed, then the report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.cli.common import at_least_one, at_least_two, at_least_zero, seed

if TYPE_CHECKING:
    from simmerge_ray.pipeline import PipelineSettings

DEFAULT_ZOO = Path(__file__).resolve().parents[2] / "configs" / "zoo_default.yaml"
FULL = {"tune_samples": 6, "folds": 5, "sim_repeats": 10}
QUICK = {"tune_samples": 0, "folds": 3, "sim_repeats": 2}  # --quick: smoke-test sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, help_text in (("demo", "end-to-end demo on the built-in testbed, with a report"),
                            ("pipeline", "the whole pipeline on a zoo config (same as demo)")):
        p = subparsers.add_parser(name, help=help_text,
                                  epilog=f"examples:\n  simmerge {name} --out runs/demo\n"
                                         f"  simmerge {name} --zoo-config configs/zoo_tiny.yaml --quick --out runs/tiny")
        p.add_argument("--out", required=True, help="run folder (reused: finished stages are skipped)")
        p.add_argument("--zoo-config", "--config", dest="zoo_config", default=str(DEFAULT_ZOO),
                       help="zoo YAML (default: configs/zoo_default.yaml)")
        p.add_argument("--tune-samples", type=at_least_zero, default=None,
                       help="Ray Tune trials of the selector's search (default 6; with --quick 0)")
        p.add_argument("--folds", type=at_least_two, default=None,
                       help="folds over model pairs of the selector evaluation (default 5; with --quick 3)")
        p.add_argument("--members", type=int, default=1,
                       help="networks averaged into each selector (an ensemble, as `fit --members`) (default: 1)")
        p.add_argument("--sim-repeats", type=at_least_one, default=None,
                       help="repeats of the bandit replay simulation (default 10; with --quick 2)")
        p.add_argument("--quick", action="store_true",
                       help="smoke-test sizes: no hyperparameter search, 3 folds, few 3/4-way labels, "
                            "2 bandit repeats (for tests and the tiny zoo); an option given as well wins")
        p.add_argument("--seed", type=seed, default=0, help="seed of every stage")
        p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
        p.set_defaults(func=run)


def pipeline_settings(args: argparse.Namespace, out: Path) -> PipelineSettings:
    """The run's settings: the full sizes, or with --quick the smoke-test ones; an option given on
    the command line wins over either (--quick --folds 10 runs 10 folds)."""
    from simmerge_ray.pipeline import PipelineSettings
    from simmerge_ray.testbed.label_plans import LabelSettings

    sizes = QUICK if args.quick else FULL
    settings = PipelineSettings(Path(args.zoo_config).resolve(), out, seed=args.seed, members=args.members,
                                **{k: sizes[k] if getattr(args, k) is None else getattr(args, k) for k in sizes})
    if args.quick:
        settings.labels = LabelSettings(subsets_3=3, subsets_4=2, mixed_3=1, mixed_4=1, orders_4=4)
    return settings


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.cli.common import verdict_line
    from simmerge_ray.pipeline import run as run_pipeline
    from simmerge_ray.ray_session import init_ray
    from simmerge_ray.pipeline.report import check_report_files, write_report
    from simmerge_ray.pipeline.runner import check_run_folder
    from simmerge_ray.pipeline.selector import check_members

    check_members(args.members)  # before hours of zoo and labels
    out = Path(args.out).resolve()
    check_run_folder(out)
    check_report_files(out)  # written last, hours later: a user's report.md there is refused now
    init_ray(args.address)
    settings = pipeline_settings(args, out)
    timings = run_pipeline(settings)
    report = write_report(out, timings)
    p = report["pairwise"]
    g = p["utility"]
    best_fixed = p["best_fixed_arm"]
    print(verdict_line(p["simmerge_vs_best_fixed"], best_fixed, p["simmerge_share_of_oracle"], " on held-out pairs"))
    print(f"\nSimMerge reaches a two-sided utility of {100 * g['simmerge']['mean']:.1f}% on held-out pairs "
          f"(best fixed arm, {best_fixed}: {100 * g[best_fixed]['mean']:.1f}%; oracle "
          f"{100 * g['oracle']['mean']:.1f}%); selection accuracy {p['selection_accuracy']:.1%}.")
    for k in ("3way", "4way"):
        if k in report["multiway"]:
            r = report["multiway"][k]
            line = ", ".join(f"{name} {100 * r[m]['expert_retention']:+.1f}% / {100 * r[m]['mean_retention']:+.1f}%"
                             for m, name in (("simmerge", "SimMerge"), ("random_order", "random order"),
                                             ("simmerge_calibrated", "SimMerge calibrated on other subsets"),
                                             ("equal_share", "model soup"), ("oracle", "oracle")) if m in r)
            print(f"{k}: retention of the expert / mean over the plan's models: {line}")
    b = report["bandit"]["regret"]
    print(f"bandit regret at round 60: {b['bandit'].get('60', float('nan')):.2f} "
          f"(uniform random {b['random'].get('60', float('nan')):.2f})")
    print(f"report: {out / 'report.md'} (and report.json, *.png); total {report['timings']['total']:.0f} s")
    return 0
