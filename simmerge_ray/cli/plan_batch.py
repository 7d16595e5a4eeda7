"""`simmerge plan-batch`: plan many requests at once on an autoscaled actor pool (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from simmerge_ray.cli.common import at_least_one, at_least_zero, features_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan-batch", help="plan merges for a table of requests (one row per target)",
                              epilog="example:\n  simmerge plan-batch --requests requests.jsonl --selector selector/ "
                                     "--catalog catalog.yaml --features feats/ --out batch/")
    p.add_argument("--requests", required=True, help="request table: .parquet (file or folder), .jsonl, or .json (lines or one array)")
    p.add_argument("--selector", required=True, help="selector folder from `simmerge fit`")
    p.add_argument("--aux-selector", default=None, help="selector fitted on aux_gap_closed (aux_weight > 0)")
    p.add_argument("--calibration", default=None,
                   help="calibration.json from `simmerge calibrate` or a pipeline run's multiway/ (needs --aux-selector): 3-/4-way "
                        "plans are ranked on retentions calibrated on measured merges, as `simmerge plan` does")
    p.add_argument("--catalog", required=True, help="catalog YAML the requests' model names refer to")
    p.add_argument("--features", required=True, type=features_folder,
                   help="features folder (features.parquet, gram.safetensors), or its features.parquet")
    p.add_argument("--out", required=True, help="folder for results.parquet, plans/, summary.json")
    p.add_argument("--cache", default=None, help="results cache folder (default: OUT/cache); reruns skip "
                                                  "requests found there")
    p.add_argument("--actors", type=at_least_one, default=None,
                   help="most planning actors; the pool grows from 1 with the backlog "
                        "(default: SIMMERGE_MAX_ACTORS, else 4)")
    p.add_argument("--rows-per-block", type=at_least_one, default=4, help="requests handed to an actor at a time")
    p.add_argument("--execute-top", type=at_least_zero, default=0, metavar="K",
                   help="merge the K plans with the highest predicted score (streaming engine)")
    p.add_argument("--merge-workers", type=at_least_one, default=None,
                   help="workers of each --execute-top merge (default: 2, fewer where the cluster holds fewer)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simmerge_ray import resources
    from simmerge_ray.planner.batch import BatchSettings, run_batch

    settings = BatchSettings(
        requests=args.requests, selector=args.selector, catalog=args.catalog, features=args.features,
        out=args.out, aux_selector=args.aux_selector, calibration=args.calibration, cache=args.cache,
        actors=args.actors or resources.max_actors(4), rows_per_block=args.rows_per_block,
        execute_top=args.execute_top, merge_workers=args.merge_workers, address=args.address)
    r = run_batch(settings)
    print(f"{r.requests} requests in {r.seconds:.1f} s ({r.requests_per_second:.1f}/s, up to {r.actors} actors): "
          f"{r.ok} ok, {r.errors} errors ({r.invalid} invalid); planned {r.planned}, from cache {r.cached}"
          + (f"; merged {r.executed}" if settings.execute_top else ""))
    out = Path(args.out)
    _print_errors(out / "results.parquet")
    print(f"wrote {out / 'results.parquet'} and {out / 'plans'}/")
    return 0


SHOWN_ERRORS = 5  # error rows printed after the counts; the rest are in results.parquet


def _print_errors(results: Path) -> None:
    """Each error row's request_id and message (the first SHOWN_ERRORS): the counts alone left the
    user to open the parquet file to learn what went wrong."""
    import polars as pl

    errors = pl.read_parquet(results, columns=["request_id", "status", "error"]).filter(pl.col("status") == "error")
    for row in errors.head(SHOWN_ERRORS).iter_rows(named=True):
        print(f"error {row['request_id']}: {row['error']}")
    if len(errors) > SHOWN_ERRORS:
        print(f"... and {len(errors) - SHOWN_ERRORS} more error rows: see the `error` column of {results}")
