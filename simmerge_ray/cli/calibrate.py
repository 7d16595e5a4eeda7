"""`simmerge calibrate`: judge the multi-way planner on the 3-/4-way merges `simmerge label`
measured on a catalog, and calibrate its predictions on them for `simmerge plan --calibration`
(what a pipeline run's multi-way stage does on its testbed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from simmerge_ray.cli.common import features_folder
from simmerge_ray.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl

MULTIWAY_LABELS = "labels_multiway.parquet"
# The columns the planner is judged on; a table without one is not `simmerge label`'s.
COLUMNS = ("models", "operators", "weighting", "k", "retention")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="judge the multi-way planner on measured 3-/4-way merges and calibrate it for plan",
        epilog="example:\n  simmerge calibrate --selector selector/ --aux-selector selector-aux/ --features feats/ \\\n"
               "      --labels labels/ --catalog catalog.yaml --out calibration/\n"
               "  simmerge plan ... --calibration calibration/calibration.json --min-way 3 --max-way 3")
    p.add_argument("--selector", required=True, help="selector folder (`simmerge fit`, two-sided utility)")
    p.add_argument("--aux-selector", required=True,
                   help="selector folder fitted with --target aux_gap_closed: the calibration reads every model's "
                        "predicted retention")
    p.add_argument("--features", required=True, type=features_folder,
                   help="features folder (features.parquet and the Gram matrices)")
    p.add_argument("--labels", required=True,
                   help=f"`simmerge label`'s output folder, or its {MULTIWAY_LABELS}: the measured 3-/4-way merges")
    p.add_argument("--catalog", required=True, help="the catalog the labels and features were measured on")
    p.add_argument("--out", required=True, help="output folder: calibration.json and multiway.json (created)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    p.set_defaults(func=run)


def multiway_labels_file(given: str | Path) -> Path:
    """The multi-way labels table of a --labels folder or file."""
    path = Path(given)
    if path.is_dir():
        path = path / MULTIWAY_LABELS
    if not path.is_file():
        raise ConfigError(f"--labels {given}: no {MULTIWAY_LABELS} there (`simmerge label --out DIR` writes "
                          f"DIR/{MULTIWAY_LABELS} beside labels.parquet)")
    return path


def read_multiway_labels(path: Path, tasks: dict[str, str | None]) -> pl.DataFrame:
    """The table's 3-/4-way rows, checked: readable, `simmerge label`'s columns of its types, some
    multi-way merge, every row a plan (k distinct models of the catalog, k - 1 known arms, a known
    weighting) with a retention per model (a number or null), some retention measured."""
    import polars as pl

    if path.name == "labels.parquet":
        raise ConfigError(f"--labels {path}: the pairwise labels; give label's folder or its {MULTIWAY_LABELS}")
    try:
        table = pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - polars and arrow raise many types for a damaged file
        raise ConfigError(f"{path}: unreadable as a parquet table ({type(e).__name__})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(map(repr, missing))}: not a table `simmerge label` wrote")
    kinds = {"k": table.schema["k"].is_integer(), "models": table.schema["models"] == pl.List(pl.String),
             "operators": table.schema["operators"] == pl.List(pl.String),
             "weighting": table.schema["weighting"] == pl.String, "retention": table.schema["retention"] == pl.String}
    if not all(kinds.values()):
        wrong = next(c for c, ok in kinds.items() if not ok)
        raise ConfigError(f"{path}: column {wrong!r} holds {table.schema[wrong]}, not what `simmerge label` writes")
    rows = table.with_row_index("row").filter(pl.col("k") >= 3)
    if rows.height == 0:
        raise ConfigError(f"{path}: no 3- or 4-way merge measured (label measures them for experts of at least 3 "
                          f"distinct tasks)")
    measured = 0
    for r in rows.iter_rows(named=True):
        measured += _check_row(path, r, tasks)
    if measured == 0:
        raise ConfigError(f"{path}: no retention measured in any multi-way row (every value is null)")
    return rows.drop("row")


def _check_row(path: Path, r: dict, tasks: dict[str, str | None]) -> int:
    """One multi-way row checked (see read_multiway_labels); returns how many retentions it measured."""
    import math

    from simmerge_ray.merge.arms import ARM_NAMES, get_weighting

    where = f"{path}: row {r['row']}"
    models, ops = r["models"] or [], r["operators"] or []
    if len(models) != r["k"] or len(set(models)) != len(models) or None in models:
        raise ConfigError(f"{where}: models {models} are not k = {r['k']} distinct names")
    unknown = [m for m in models if m not in tasks]
    if unknown:
        raise ConfigError(f"{where}: model {unknown[0]!r} is not in the catalog (labels of another catalog?)")
    if len(ops) != len(models) - 1 or any(op not in ARM_NAMES for op in ops):
        raise ConfigError(f"{where}: operators {ops} are not {len(models) - 1} known arms ({', '.join(ARM_NAMES)})")
    try:
        get_weighting(r["weighting"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        value = json.loads(r["retention"] or "")
    except ValueError:
        value = None
    numbers = isinstance(value, dict) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in value.values())
    if not numbers or set(value) != set(models):
        raise ConfigError(f"{where}: retention is not a JSON object of a finite number or null per model of the row")
    return sum(v is not None for v in value.values())


def run(args: argparse.Namespace) -> int:
    from simmerge_ray.catalog import Catalog
    from simmerge_ray.features.provenance import check_labels_measured_alike, check_measured_from
    from simmerge_ray.io.atomic import atomic_output_dir
    from simmerge_ray.io.out_checks import check_output
    from simmerge_ray.pipeline.multiway import CALIBRATION_FILE, MULTIWAY_FILE, judge_and_calibrate

    features = Path(args.features)
    catalog = Catalog.load(args.catalog)
    labels_file = multiway_labels_file(args.labels)
    labels = read_multiway_labels(labels_file, catalog.model_tasks)
    models = sorted({m for ms in labels.get_column("models").to_list() for m in ms})
    check_measured_from(features, catalog, models)
    check_labels_measured_alike(features, labels_file)
    inputs = [*catalog.paths, args.selector, args.aux_selector, features, labels_file]
    out = check_output(args.out, overwrite=args.overwrite, inputs=inputs)
    result, calibration = judge_and_calibrate(Path(args.selector), Path(args.aux_selector), features,
                                              catalog.model_tasks, labels)
    with atomic_output_dir(out, overwrite=args.overwrite, inputs=inputs) as tmp:
        (tmp / MULTIWAY_FILE).write_text(json.dumps(result, indent=2))
        (tmp / CALIBRATION_FILE).write_text(calibration)
    for size in sorted(k for k in result if k.endswith("way")):
        print(summary_line(size, result[size]))
    print(f"calibration -> {out / CALIBRATION_FILE} (give it to `simmerge plan --calibration` with these selectors)")
    return 0


def summary_line(size: str, r: dict) -> str:
    """The planner against random order and the model soup on one plan size, expert / mean retention."""
    def pair(key: str) -> str:
        v = r.get(key)
        return "n/a" if not v else f"{100 * v['expert_retention']:+.1f} / {100 * v['mean_retention']:+.1f}"

    return (f"{size}: {r['subsets']} subsets, {r['targets']} expert choices; retention, expert / mean (%): "
            f"planner {pair('simmerge')}, calibrated (held-out subsets) {pair('simmerge_calibrated')}, "
            f"random order {pair('random_order')}, model soup {pair('equal_share')}, oracle {pair('oracle')}")
