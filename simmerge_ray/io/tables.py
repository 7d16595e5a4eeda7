"""Reading the parquet tables users and stages hand each other, with one-line errors."""

from __future__ import annotations

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


def read_labels(path: Path) -> pl.DataFrame:
    """A labels table (`simmerge label`'s labels.parquet); a row with a null name among its key
    columns is refused by file and column: it has no pair or arm to stand for, and readers sort
    and join on these names."""
    df = read_table(path, "labels")
    for col in LABEL_KEYS:
        if col in df.columns and (nulls := df[col].null_count()):
            raise ConfigError(f"{path}: column {col!r} is null in {nulls} row(s); every label names its "
                              f"task, expert, aux and operator")
    return df
