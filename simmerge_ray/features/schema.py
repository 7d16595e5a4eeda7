"""The feature table's schema, one declaration for everything that reads `features.parquet` (the
selector, the bandit, the planner's propagation): the key columns of a row, and the prefixes that
mark structural (weight-space) and functional (probe) features."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.tables import names_as_text, read_table

KEY_COLUMNS: tuple[str, ...] = ("a", "b", "task")  # expert (or merge so far), joining model, task
STRUCTURAL_PREFIX = "s_"
FUNCTIONAL_PREFIX = "f_"
FEATURE_PREFIXES: tuple[str, ...] = (STRUCTURAL_PREFIX, FUNCTIONAL_PREFIX)
# Functional columns measured on the joining model's own task's probes: null where it is no task's
# expert (a generalist), the only feature columns the feature stages leave undefined for a pair.
B_TASK_SUFFIX = "_on_b_task"


def feature_columns(df: pl.DataFrame, prefixes: tuple[str, ...] = FEATURE_PREFIXES) -> list[str]:
    """The numeric columns with the given prefixes, in table order."""
    return [c for c, dtype in df.schema.items() if c.startswith(prefixes) and dtype.is_numeric()]


def check_finite_features(df: pl.DataFrame, source: str, columns: Sequence[str] | None = None) -> None:
    """Refuse an infinite feature among `columns` (default: every feature column): NaN marks an
    undefined value (imputed), but an infinity would turn every prediction made from its row
    into NaN without a word. A column nothing reads is not checked."""
    for c in feature_columns(df) if columns is None else [c for c in columns if c in df.columns]:
        if not (df.schema[c].is_numeric() or df.schema[c] == pl.Null):  # text such as "0.5" is not cast
            raise ConfigError(f"{source}: column {c!r} holds {df.schema[c]}, not numbers")
        if not df.schema[c].is_float():
            continue
        bad = df.filter(pl.col(c).is_infinite())
        if bad.height:
            r = bad.row(0, named=True)
            key = ", ".join(f"{k} {r[k]!r}" for k in KEY_COLUMNS if k in r)
            raise ConfigError(f"{source}: column {c!r} is {r[c]} in {bad.height} row(s) (first: {key}); "
                              f"a feature must be finite (NaN marks undefined)")


def check_key_columns(df: pl.DataFrame, source: str) -> None:
    """Every row names its a, b and task: readers look rows up and sort by these names, and a
    missing column made other checks speak of duplicate keys, a null one a traceback (or its row
    was dropped by every join without a word)."""
    for c in KEY_COLUMNS:
        if c not in df.columns:
            raise ConfigError(f"{source}: no column {c!r} (a feature table has one row per a, b, task)")
        if df.schema[c] != pl.String:  # readers cast Categorical and Enum names first (io/tables.names_as_text)
            raise ConfigError(f"{source}: column {c!r} holds {df.schema[c]}, not names")
        if nulls := df[c].null_count():
            raise ConfigError(f"{source}: column {c!r} is null in {nulls} row(s); every row names its a, b and task")


def check_unique_keys(df: pl.DataFrame, source: str) -> None:
    """One row per (a, b, task): of two rows for a pair, a reader would take either without a word."""
    keys = [k for k in KEY_COLUMNS if k in df.columns]
    dup = df.group_by(keys, maintain_order=True).len().filter(pl.col("len") > 1) if keys else None
    if dup is not None and dup.height:
        r = dup.row(0, named=True)
        raise ConfigError(f"{source}: {dup.height} (a, b, task) key(s) appear in more than one row (first: "
                          + ", ".join(f"{k} {r[k]!r}" for k in keys) + f", {r['len']} rows)")


def check_features_cover(labels: pl.DataFrame, features: pl.DataFrame, source: str) -> None:
    """Refuse labels of a (task, expert, aux) the feature table has no row for: a reader that
    dropped them (the selector's fit, the bandit's warm start) would learn from part of the labels
    without a word. Columns that are missing or hold no names are left to the reader to name."""
    keys = ("task", "expert", "aux")
    if not all(c in labels.columns and labels[c].dtype == pl.String for c in keys) or not all(
            c in features.columns and features[c].dtype == pl.String for c in KEY_COLUMNS):
        return
    lacking = labels.select(keys).unique().join(
        features.select(KEY_COLUMNS).rename({"a": "expert", "b": "aux"}), on=list(keys), how="anti")
    if lacking.height:
        first = lacking.sort(keys).row(0)
        raise ConfigError(f"{source}: no row for {lacking.height} labelled (task, expert, aux), e.g. {first}; "
                          f"measure features for every labelled pair, or drop those labels")


def read_feature_table(path: Path, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """A feature table from disk: one row per key, the feature values that will be read
    (`columns`, default all) checked finite."""
    df = names_as_text(read_table(path, "feature table"), KEY_COLUMNS)
    check_key_columns(df, str(path))
    check_unique_keys(df, str(path))
    check_finite_features(df, str(path), columns)
    return df
