"""`simmerge features <kind>`: similarity features of every model pair of a catalog.

`structural` (weights) lives here. Other kinds live in their own modules: a module
`simmerge_ray.cli.features_<kind>` exposing `register_feature(subparsers)` (which adds its
parser to the `features` sub-commands and sets `func`) is picked up by adding its name to
FEATURE_MODULES below, e.g. "features_functional" for `simmerge features functional`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from shlex import quote

from simmerge_ray.cli.common import at_least_one

# Modules under simmerge_ray.cli adding a `simmerge features <kind>` sub-command.
FEATURE_MODULES: tuple[str, ...] = ("features_functional",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="similarity features of every model pair of a catalog",
                              epilog="examples:\n  simmerge features structural --catalog catalog.yaml --out feats/\n"
                                     "  simmerge features functional --catalog catalog.yaml --out feats/")
    kinds = p.add_subparsers(dest="feature_kind", required=True, metavar="KIND")
    _register_structural(kinds)
    for name in FEATURE_MODULES:
        importlib.import_module(f"simmerge_ray.cli.{name}").register_feature(kinds)


def _register_structural(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("structural", help="weight-space features (cosines, l2, task vectors, sign "
                                            "agreement) and per-tensor Gram matrices, in one read pass",
                         epilog="example:\n  simmerge features structural --catalog catalog.yaml --out feats/")
    p.add_argument("--catalog", required=True, help="catalog YAML (models, optional base)")
    p.add_argument("--out", required=True, help="output folder, shareable with `features functional` "
                                                "(structural.parquet, gram.safetensors, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this stage's files from an earlier run (no other file of --out)")
    p.add_argument("--workers", type=at_least_one, default=None,
                   help="actors in the pool (default: SIMMERGE_MAX_ACTORS, else one per free CPU, as many as the "
                        "cluster holds with the memory ask)")
    p.add_argument("--chunk-elems", type=at_least_one, default=1 << 20, help="values mapped per model per step")
    p.add_argument("--precision", choices=["float32", "float64"], default="float32",
                   help="Gram products in float32 (default; ~1e-7 relative error, 1.65x faster) or float64 "
                        "(exact products of bf16 weights)")
    p.add_argument("--no-cache", action="store_true", help="recompute every Gram entry, reading and writing no Gram cache (the file-digest store, which only spares re-hashing unchanged files, is still used)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run_structural)


def run_structural(args: argparse.Namespace) -> int:
    from simmerge_ray.features.structural import StructuralOptions
    from simmerge_ray.pipeline.features import structural

    opts = StructuralOptions(workers=args.workers, chunk_elems=args.chunk_elems, precision=args.precision,
                             use_cache=not args.no_cache, overwrite=args.overwrite)
    from simmerge_ray.features.joined import JOINED_FILE

    structural(Path(args.catalog), Path(args.out), opts, address=args.address)
    if not (Path(args.out) / JOINED_FILE).is_file():  # the join needs both stages' tables
        print(f"next: simmerge features functional --catalog {quote(str(args.catalog))} --out {quote(str(args.out))} "
              f"(it writes {JOINED_FILE}, which fit, plan and bandit-init read)")
    return 0
