"""The bandit a new state folder starts from (`simmerge bandit-init`).

A warm start goes through `simulate.warm_bandit`, the function the replay simulator (and so the
pipeline's bandit stage) measures: the bandit that is served is the one whose regret was reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from simmerge_ray.bandit.encoder import Encoder, IdentityEncoder
from simmerge_ray.bandit.lints import LinTS
from simmerge_ray.bandit.simulate import SimSettings, float_columns, prior_bandit, replay_data, warm_bandit
from simmerge_ray.errors import ConfigError
from simmerge_ray.features.schema import check_finite_features, feature_columns


@dataclass(frozen=True)
class InitialBandit:
    encoder: Encoder
    bandit: LinTS
    dropped: tuple[str, ...]  # feature columns left out: defined in no row
    contexts: int  # offline contexts absorbed; 0 for a cold start


def _usable(features: pl.DataFrame, source: str) -> tuple[list[str], list[str], np.ndarray]:
    check_finite_features(features, source)
    numeric = feature_columns(features)
    values = float_columns(features, numeric)
    ok = ~np.isnan(values).all(axis=0)
    kept = [c for c, good in zip(numeric, ok) if good]
    if not kept:
        raise ConfigError(f"{source}: no numeric column prefixed s_ or f_ that is defined in some row")
    return kept, [c for c in numeric if c not in kept], values[:, ok]


def usable_feature_columns(features: pl.DataFrame, source: str = "features") -> tuple[list[str], list[str]]:
    """(kept, dropped) numeric feature columns. A column defined in no row (e.g. the middle depth
    third of a 2-layer model, which has no layer) carries no usable context (an infinite value
    anywhere is refused by name); one undefined in some rows only (e.g. measured on the auxiliary's task, where some
    auxiliaries have none) is kept, and the encoder imputes its mean there."""
    kept, dropped, _ = _usable(features, source)
    return kept, dropped


def left_out_line(dropped: Sequence[str]) -> str:
    """What a command prints about the columns usable_feature_columns left out."""
    return f"{len(dropped)} feature column(s) left out (defined in no row): {', '.join(dropped)}"


def initial_bandit(features: pl.DataFrame, settings: SimSettings, *, labels: pl.DataFrame | None = None,
                   operators: Sequence[str] = (), source: str = "features",
                   encoder: Encoder | None = None) -> InitialBandit:
    """A bandit warm-started from `labels` (every operator they measure) or, without labels, cold
    with `operators`, over `encoder` (e.g. the offline selector's, METHOD.md) or, without one, the
    identity encoder fitted on every row of the feature table; `source` names the table in errors."""
    if encoder is None:
        names, dropped, values = _usable(features, source)  # the table converted once
        encoder = IdentityEncoder.fit(names, values)
    else:
        names, dropped = list(encoder.feature_names), []
        lacking = [c for c in names if c not in features.columns]
        if lacking:
            raise ConfigError(f"{source}: lacks {len(lacking)} of the encoder's {len(names)} features "
                              f"(first: {lacking[0]!r}); measure them as the selector's training features were")
    if labels is not None:
        data = replay_data(labels, features, names, source=source)
        bandit = warm_bandit(encoder, data.operators, encoder.encode(data.x), data.rewards, settings)
        return InitialBandit(encoder, bandit, tuple(dropped), len(data.keys))
    if not operators:
        raise ConfigError("give labels (warm start) or operators (cold start)")
    return InitialBandit(encoder, prior_bandit(encoder, operators, settings.bandit), tuple(dropped), 0)
