"""`simmerge features functional --catalog C --out DIR`: functional pair features per task.

Runs whatever probe inference the cache lacks (same flags as `simmerge probe`), then writes
DIR/functional.parquet, and DIR/features.parquet when DIR/structural.parquet is already there.
Vocabulary mismatches are refused before any model runs.
"""

from __future__ import annotations

import argparse

from simmerge_ray.cli.probe import add_probe_flags, probe_request


def register_feature(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("functional", help="KL, activation and attention cosines of every model pair "
                                            "per task, from cached probe inference",
                         epilog="example:\n  simmerge features functional --catalog catalog.yaml --out feats/")
    add_probe_flags(p)
    p.set_defaults(func=run_functional)


def run_functional(args: argparse.Namespace) -> int:
    from simmerge_ray.pipeline.features import functional

    functional(probe_request(args))
    return 0
