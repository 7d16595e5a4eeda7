"""Reading the parquet tables users and stages hand each other, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from simmerge_ray.errors import ConfigError


def read_table(path: Path, what: str) -> pl.DataFrame:
    """A parquet table; a missing or unreadable file is one ConfigError naming it as `what`."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ConfigError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None
