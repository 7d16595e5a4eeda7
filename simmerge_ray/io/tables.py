"""Reading the parquet tables users and stages hand each other, with one-line errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from simmerge_ray.errors import ConfigError, first_line


def read_table(path: Path, what: str) -> pl.DataFrame:
    """A parquet table; a missing or unreadable file is one ConfigError naming it as `what`."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ConfigError(f"{path}: unreadable {what} ({first_line(e)})") from None


LABEL_KEYS: tuple[str, ...] = ("task", "expert", "aux", "operator")
LABEL_SCORES: tuple[str, ...] = ("utility", "gap_closed", "aux_gap_closed")  # what fit and the bandit learn from


def names_as_text(df: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    """The name columns among `columns` stored as Categorical or Enum (as pandas and polars users
    often write them) cast to String: readers compare and join names as strings, so a categorical
    key passed the checks of one reader and was refused by the next."""
    cast = [c for c in columns if c in df.columns and isinstance(df.schema[c], (pl.Categorical, pl.Enum))]
    return df.with_columns(pl.col(cast).cast(pl.String)) if cast else df


def read_labels(path: Path, required: Sequence[str] = ()) -> pl.DataFrame:
    """A labels table (`simmerge label`'s labels.parquet); a row with a null name among its key
    columns is refused by file and column: it has no pair or arm to stand for, and readers sort
    and join on these names. A score column must hold numbers (text such as "0.5" would be cast
    by one reader and refused by another). A column of `required` that is missing is named with
    the file (a reader of the frame alone can only say "labels", e.g. for a feature table given)."""
    df = names_as_text(read_table(path, "labels"), LABEL_KEYS)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: missing columns {missing} (is it a labels.parquet?)")
    for col in LABEL_KEYS:
        if col in df.columns and (nulls := df[col].null_count()):
            raise ConfigError(f"{path}: column {col!r} is null in {nulls} row(s); every label names its "
                              f"task, expert, aux and operator")
    for col in LABEL_SCORES:
        if col in df.columns and not df[col].dtype.is_numeric():
            raise ConfigError(f"{path}: column {col!r} holds {df[col].dtype}, not numbers")
    return df
