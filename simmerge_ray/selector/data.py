"""Training data of the selector: one row per (task, expert, aux) with every arm's utility.

Labels are full-information (every operator was merged and evaluated for every pair), so each
row carries a vector of utilities; features x(a=expert, b=aux, t=task) come from the feature
table. Feature columns are the numeric columns prefixed `s_` (structural) or `f_`
(functional); their sorted names are the selector's feature schema.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.tables import read_labels
from simmerge_ray.features.schema import KEY_COLUMNS, check_features_cover, feature_columns, read_feature_table

# Below this many labelled pairs ((expert, aux, task) rows) `fit` and `evaluate-selector` warn. A
# rule of thumb, not a measurement: each held-out fold then holds a handful of pairs per task and
# nine arms' utilities are fitted from them, so a selector rarely beats the best fixed arm.
MIN_LABELLED_PAIRS = 50
UTILITY_CLIP = (-2.0, 2.0)  # GapClosed can explode where the expert-aux gap is tiny


def few_pairs_text(n: int) -> str:
    """Why n labelled pairs (below MIN_LABELLED_PAIRS) are too few: the words of the console's
    warning (pipeline/selector.warn_few_pairs) and of the report's caution."""
    return (f"only {n} labelled pairs (fewer than {MIN_LABELLED_PAIRS}): too few to trust the selector over a "
            f"fixed arm; label more experts or tasks")


@dataclass
class PairData:
    """Arrays for training and evaluation, aligned row by row."""

    x: np.ndarray  # [n, d] raw features
    y: np.ndarray  # [n, k] utility per arm (the fitted target), clipped
    tasks: list[str]  # [n]
    experts: list[str]
    auxes: list[str]
    feature_names: list[str]
    operators: list[str]
    gap: np.ndarray | None = None  # [n, k] the paper's one-sided GapClosed beside a two-sided target
    aux_tasks: list[str | None] | None = None  # [n] the auxiliary's task (None: the labels lack aux_task)
    undefined_features: tuple[str, ...] = ()  # the table's feature columns null in every row: not in x

    @property
    def same_task_pairs(self) -> bool | None:
        """Whether any row pairs two experts of one task (None: unknown, no aux_task column)."""
        if self.aux_tasks is None:
            return None
        return any(t == u for t, u in zip(self.tasks, self.aux_tasks))

    @property
    def pair_keys(self) -> list[str]:
        """Unordered model pair: the unit that must never straddle train and test."""
        return ["|".join(sorted((a, b))) for a, b in zip(self.experts, self.auxes)]

    def subset(self, idx: np.ndarray | list[int]) -> "PairData":
        idx = np.asarray(idx, dtype=int)
        return replace(self, x=self.x[idx], y=self.y[idx], tasks=[self.tasks[i] for i in idx],
                       experts=[self.experts[i] for i in idx], auxes=[self.auxes[i] for i in idx],
                       gap=None if self.gap is None else self.gap[idx],
                       aux_tasks=None if self.aux_tasks is None else [self.aux_tasks[i] for i in idx])

    def select_features(self, names: list[str]) -> "PairData":
        """These columns, in this order; one of `undefined_features` comes back as NaN (the
        selector imputes it), as when a target zoo has no row where it is defined."""
        nan = np.full(len(self.tasks), np.nan)
        x = np.stack([nan if n in self.undefined_features else self.x[:, self.feature_names.index(n)]
                      for n in names], axis=1) if names else self.x[:, :0]
        return replace(self, x=x, feature_names=list(names), undefined_features=())

    def __len__(self) -> int:
        return len(self.tasks)


TARGETS = ("utility", "gap_closed", "aux_gap_closed")
# Each target's value for not merging (the expert alone), from testbed/label_tables.py: on the
# expert's task GapClosed = (s_e - s_a) / (s_e - s_a) = 1; on the auxiliary's task
# (s_ea - s_ea) / (s_aa - s_ea) = 0; the two-sided utility is their mean, 1/2.
EXPERT_ALONE = {"utility": 0.5, "gap_closed": 1.0, "aux_gap_closed": 0.0}


def _wide(labels: pl.DataFrame, ops: list[str], value: str) -> pl.DataFrame:
    """One row per (task, expert, aux), one column per arm, complete rows only."""
    return (
        labels.filter(pl.col("operator").is_in(ops))
        .group_by(["task", "expert", "aux", "operator"]).agg(pl.col(value).mean())
        .pivot(on="operator", index=["task", "expert", "aux"], values=value)
        .drop_nulls(subset=ops)
    )


def build_pair_data(labels: pl.DataFrame, features: pl.DataFrame, *,
                    operators: list[str] | None = None, target: str = "utility") -> PairData:
    """Pivot labels to one utility vector per (task, expert, aux) and join the features.

    `target` is the label column fitted: `utility` (two-sided, METHOD.md), `gap_closed` (the
    expert's side) or `aux_gap_closed`. Rows lacking an operator's label or the pair's features
    are dropped; an empty result is an error saying which side is missing.
    """
    if target not in TARGETS:
        raise ConfigError(f"target: {target!r} is not one of {', '.join(TARGETS)}")
    for col in ("task", "expert", "aux", "operator", target):
        if col not in labels.columns:
            raise ConfigError(f"labels table: missing column {col!r}")
    for col in KEY_COLUMNS:
        if col not in features.columns:
            raise ConfigError(f"feature table: missing column {col!r}")
    for what, table, cols in (("labels table", labels, ("task", "expert", "aux", "operator")),
                              ("feature table", features, KEY_COLUMNS)):
        for col in cols:
            if table[col].dtype != pl.String:
                raise ConfigError(f"{what}: column {col!r} holds {table[col].dtype}, not names")
    ops = operators or sorted(labels["operator"].unique().to_list())
    wide = _wide(labels, ops, target)
    if target != "gap_closed" and "gap_closed" in labels.columns:
        gap_wide = _wide(labels, ops, "gap_closed").rename({o: f"gap:{o}" for o in ops})
        wide = wide.join(gap_wide, on=["task", "expert", "aux"], how="left")
    if "aux_task" in labels.columns:
        aux_task = labels.select("task", "expert", "aux", "aux_task").unique(subset=["task", "expert", "aux"])
        wide = wide.join(aux_task, on=["task", "expert", "aux"], how="left")
    names = sorted(feature_columns(features))
    if not names:
        raise ConfigError("feature table: no numeric columns prefixed s_ or f_")
    joined = wide.join(features.rename({"a": "expert", "b": "aux"}), on=["expert", "aux", "task"], how="inner")
    joined = joined.with_columns(pl.col(names).cast(pl.Float64).fill_nan(None)).sort(["task", "expert", "aux"])
    # Undefined features are null: in whole columns (an empty depth third of a shallow model,
    # task vectors without a base) they leave the schema; in some rows (a LoRA expert's
    # untouched embeddings have no task-vector direction) they stay NaN, and the selector
    # imputes the training mean (0 after standardisation) for them.
    undefined = tuple(c for c in names if joined[c].null_count() == joined.height)
    names = [c for c in names if c not in undefined]
    if joined.height == 0:
        raise ConfigError(
            f"no (task, expert, aux) row has both labels ({wide.height} labelled) and features "
            f"({features.height} feature rows): check that model and task names agree"
        )
    x = joined.select(names).to_numpy().astype(np.float64)  # nulls -> NaN
    y = np.clip(joined.select(ops).to_numpy().astype(np.float64), *UTILITY_CLIP)
    gap_cols = [f"gap:{o}" for o in ops]
    gap = (np.clip(joined.select(gap_cols).to_numpy().astype(np.float64), *UTILITY_CLIP)
           if all(c in joined.columns for c in gap_cols) else None)
    aux_tasks = joined["aux_task"].to_list() if "aux_task" in joined.columns else None
    return PairData(x, y, joined["task"].to_list(), joined["expert"].to_list(), joined["aux"].to_list(),
                    names, list(ops), gap, aux_tasks, undefined)


def features_file(features: str | Path) -> Path:
    """The feature table of a features folder, or the parquet file given."""
    p = Path(features)
    return p / "features.parquet" if p.is_dir() else p


def load_pair_data(features: str | Path, labels: str | Path, target: str = "utility") -> PairData:
    """PairData from a features folder (or parquet file) and a labels parquet (`target`: see
    build_pair_data)."""
    feats_path = features_file(features)
    if Path(features).is_dir() and not feats_path.exists():
        raise ConfigError(f"{features}: no {feats_path.name} in this folder (run `simmerge features structural` "
                          f"and `simmerge features functional` with --out {features} first)")
    feats, labs = read_feature_table(feats_path), read_labels(Path(labels))
    if target not in labs.columns:
        raise ConfigError(f"{labels}: no column {target!r}")
    bad = labs.filter(pl.col(target).is_nan() | pl.col(target).is_infinite()) if labs[target].dtype.is_float() else None
    if bad is not None and bad.height:
        r = bad.row(0, named=True)
        raise ConfigError(f"{labels}: column {target!r}: {r[target]} is not a finite number ({bad.height} rows; first: "
                          f"task {r.get('task')!r}, expert {r.get('expert')!r}, aux {r.get('aux')!r}, "
                          f"operator {r.get('operator')!r})")
    if not labs[target].dtype.is_numeric():
        raise ConfigError(f"{labels}: column {target!r} holds {labs[target].dtype}, not numbers")
    check_features_cover(labs, feats, str(feats_path))
    check_every_arm(labs, target, str(labels))
    from simmerge_ray.features.provenance import check_labels_measured_alike

    check_labels_measured_alike(feats_path, Path(labels))
    return build_pair_data(labs, feats, target=target)


def check_every_arm(labels: pl.DataFrame, target: str, source: str) -> None:
    """Refuse a (task, expert, aux) labelled for some arms but not all: build_pair_data keeps
    complete rows only, so the pair was dropped without a word (a pair with no value on any arm,
    an undefined auxiliary gap, is dropped as the label stage means). Missing or unnamed columns
    are left to build_pair_data to name."""
    keys = ["task", "expert", "aux"]
    if not all(c in labels.columns and labels[c].dtype == pl.String for c in (*keys, "operator")):
        return
    ops = sorted(labels["operator"].drop_nulls().unique().to_list())
    have = (labels.filter(pl.col(target).is_not_null()).group_by(keys)
            .agg(pl.col("operator").unique().alias("ops")).filter(pl.col("ops").list.len() < len(ops)).sort(keys))
    if have.height:
        r = have.row(0, named=True)
        missing = [o for o in ops if o not in r["ops"]]
        raise ConfigError(f"{source}: {have.height} labelled (task, expert, aux) lack some arm's {target!r}, e.g. "
                          f"{(r['task'], r['expert'], r['aux'])} has none for {', '.join(map(repr, missing[:3]))}; "
                          f"label every arm of a pair, or drop the pair")
