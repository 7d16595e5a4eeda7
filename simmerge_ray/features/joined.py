"""The joined feature table: DIR/features.parquet = functional rows with the structural columns
of their (a, b). The two stages run in either order into one folder; whichever finishes second
writes the join, so it always reflects both stages' latest files: when they no longer join
(one stage rerun on another catalog), the old join is removed, never left beside them."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.features.provenance import check_stages_agree
from simmerge_ray.io.stage_files import remove_stage_file, stage_files
from simmerge_ray.io.tables import read_table

STRUCTURAL_FILE = "structural.parquet"
FUNCTIONAL_FILE = "functional.parquet"
JOINED_FILE = "features.parquet"


def join_structural(functional: pl.DataFrame, structural_path: Path) -> pl.DataFrame:
    """x(a, b, t): functional rows with the structural columns of their (a, b); every pair must exist."""
    structural = read_table(structural_path, "structural feature table")
    missing = functional.join(structural.select("a", "b"), on=["a", "b"], how="anti")
    if missing.height:
        a, b = missing.row(0, named=True)["a"], missing.row(0, named=True)["b"]
        raise ConfigError(
            f"{structural_path}: no structural row for pair ({a}, {b}) ({missing.height} functional rows "
            f"unmatched); was it computed from the same catalog?"
        )
    return functional.join(structural, on=["a", "b"], how="left", maintain_order="left", validate="m:1")


def write_joined(out: Path) -> Path | None:
    """Write DIR/features.parquet when both stages' tables are in `out`; returns its path."""
    out = Path(out)
    if not ((out / STRUCTURAL_FILE).exists() and (out / FUNCTIONAL_FILE).exists()):
        return None
    try:
        check_stages_agree(out)
        joined = join_structural(read_table(out / FUNCTIONAL_FILE, "functional feature table"), out / STRUCTURAL_FILE)
    except ConfigError as e:
        if remove_stage_file(out, "joined", JOINED_FILE):
            raise ConfigError(f"{e} ({JOINED_FILE}, which joined the previous tables, was removed: run the other "
                              f"feature stage on this catalog)") from None
        raise
    with stage_files(out, "joined", (JOINED_FILE,), replace=True) as tmp:
        joined.write_parquet(tmp / JOINED_FILE)
    return out / JOINED_FILE
