"""`simmerge features functional --catalog C --out DIR`: functional pair features per task.

Runs whatever probe inference the cache lacks (same flags as `simmerge probe`), then writes
DIR/functional.parquet, and DIR/features.parquet when DIR/structural.parquet is already there.
Vocabulary mismatches are refused before any model runs.
"""

from __future__ import annotations

import argparse

from simmerge_ray.cli.probe import add_probe_flags, print_summary, probe_from_args, write_manifest


def register_feature(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("functional", help="KL, activation and attention cosines of every model pair "
                                            "per task, from cached probe inference",
                         epilog="example:\n  simmerge features functional --catalog catalog.yaml --out feats/")
    add_probe_flags(p)
    p.set_defaults(func=run_functional)


def run_functional(args: argparse.Namespace) -> int:
    from simmerge_ray.features.functional import write_functional_features
    from simmerge_ray.features.joined import FUNCTIONAL_FILE, JOINED_FILE

    run = probe_from_args(args, require_comparable=True, outputs=(FUNCTIONAL_FILE, JOINED_FILE))
    print_summary(run)
    write_manifest(run)
    for what, path in write_functional_features(run.plans, run.out).items():
        print(f"wrote {what}: {path}")
    return 0
