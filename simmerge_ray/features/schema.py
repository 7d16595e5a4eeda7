"""The feature table's schema, one declaration for everything that reads `features.parquet` (the
selector, the bandit, the planner's propagation): the key columns of a row, and the prefixes that
mark structural (weight-space) and functional (probe) features."""

from __future__ import annotations

import polars as pl

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
