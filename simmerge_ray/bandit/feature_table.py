"""Resolve (model a, model b, task) to the raw feature vector x(a, b, t) of the feature table
(`features.parquet`: string columns a, b, task and Float64 columns prefixed s_ / f_)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.bandit.errors import FeatureError, UnknownNameError, known_list
from simmerge_ray.features.schema import KEY_COLUMNS, check_key_columns, check_unique_keys, read_feature_table
from simmerge_ray.io.tables import names_as_text


class FeatureTable:
    """An in-memory index of a feature table, in a fixed column order."""

    def __init__(self, df: pl.DataFrame, feature_names: Sequence[str], source: str = "features"):
        missing = [c for c in (*KEY_COLUMNS, *feature_names) if c not in df.columns]
        if missing:
            raise ConfigError(f"{source}: missing columns {missing}")
        self.source = source
        self.feature_names = tuple(feature_names)
        df = names_as_text(df, KEY_COLUMNS)  # as read_feature_table reads them
        check_key_columns(df, source)
        check_unique_keys(df, source)
        keys = df.select(KEY_COLUMNS).rows()
        self._row = {key: i for i, key in enumerate(keys)}
        self._x = df.select(self.feature_names).cast(pl.Float64).to_numpy()
        self.models = frozenset(df["a"].to_list()) | frozenset(df["b"].to_list())
        self.tasks = frozenset(df["task"].to_list())

    @classmethod
    def load(cls, path: Path, feature_names: Sequence[str]) -> FeatureTable:
        return cls(read_feature_table(Path(path), feature_names), feature_names, source=str(path))

    def lookup(self, a: str, b: str, task: str) -> np.ndarray:
        """x(a, b, task) as float64 [d], NaN where undefined (a null in the table); names that are
        not in the table raise UnknownNameError. The messages name the feature table by its file
        name only: the service returns them to HTTP clients, who have no business with its path."""
        where = Path(self.source).name
        for kind, name, known in (("model", a, self.models), ("model", b, self.models),
                                  ("task", task, self.tasks)):
            if name not in known:
                raise UnknownNameError(f"unknown {kind} {name!r} (known {kind}s: {known_list(known)})")
        row = self._row.get((a, b, task))
        if row is None:
            raise UnknownNameError(f"{where}: no features for pair ({a!r}, {b!r}) on task {task!r}")
        x = self._x[row]
        if np.isinf(x).any():
            bad = [n for n, v in zip(self.feature_names, x) if np.isinf(v)]
            raise FeatureError(f"{where}: ({a}, {b}, {task}) has infinite features {bad}")
        return x.copy()  # NaN where a feature is undefined for this pair: the encoder imputes it
