"""A synthetic merge-selection problem with a known optimum, in the project's table schemas.

Every ordered pair (a, b) of `n_models` models on every task gets random features x; each
operator's GapClosed is `bias_o + x . w_o + noise`, so the best operator changes with the
context and a linear bandit over x can learn it. Used by tests and by `simmerge bandit-sim
--synthetic` when no testbed labels exist yet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from simmerge_ray.merge.arms import SYNTHETIC_BANDIT_ARMS


@dataclass(frozen=True)
class SyntheticBanditSpec:
    n_models: int = 10
    tasks: tuple[str, ...] = ("code", "math", "multilingual")
    operators: tuple[str, ...] = SYNTHETIC_BANDIT_ARMS
    n_features: int = 8
    weight_scale: float = 0.15
    noise_std: float = 0.05
    seed: int = 0


def synthetic_tables(spec: SyntheticBanditSpec = SyntheticBanditSpec()) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(labels, features): labels has task, expert, aux, aux_task, operator, params, utility (and
    gap_closed, the same values);
    features has a, b, task and Float64 columns s_* / f_*."""
    rng = np.random.default_rng(spec.seed)
    models = [f"m{i}" for i in range(spec.n_models)]
    names = _feature_names(spec.n_features)
    bias = rng.uniform(0.3, 0.6, size=len(spec.operators))
    weights = rng.normal(0.0, spec.weight_scale, size=(spec.n_features, len(spec.operators)))
    feature_rows: list[dict[str, object]] = []
    label_rows: list[dict[str, object]] = []
    for task_index, task in enumerate(spec.tasks):
        aux_task = spec.tasks[(task_index + 1) % len(spec.tasks)]
        for a in models:
            for b in models:
                if a == b:
                    continue
                x = rng.normal(size=spec.n_features)
                feature_rows.append({"a": a, "b": b, "task": task, **dict(zip(names, x.tolist()))})
                gaps = bias + x @ weights + rng.normal(0.0, spec.noise_std, size=len(spec.operators))
                for op, gap in zip(spec.operators, gaps.tolist()):
                    label_rows.append({
                        "task": task, "expert": a, "aux": b, "aux_task": aux_task,
                        "operator": op, "params": json.dumps({}), "gap_closed": gap,
                        "utility": gap,
                    })
    schema = {"a": pl.String, "b": pl.String, "task": pl.String, **{n: pl.Float64 for n in names}}
    return pl.DataFrame(label_rows), pl.DataFrame(feature_rows, schema=schema)


def _feature_names(n: int) -> Sequence[str]:
    """Half structural-like (s_), half functional-like (f_) names, as in the real table."""
    return [f"s_syn{i}" if i < n // 2 else f"f_syn{i}" for i in range(n)]
