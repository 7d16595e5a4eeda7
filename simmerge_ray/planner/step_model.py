"""The step model of the planner: the pairwise selector applied to propagated features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from simmerge_ray.planner.propagate import (
    PROXY_PREFIXES, GramTable, MergeState, PairLookup, initial_state, proxy_features, step_state,
    structural_features,
)
from simmerge_ray.selector.model import Selector


class SelectorStepModel:
    """Scores (merge so far, next model) steps with a trained selector, never building merges.

    `aux_selector`, when given, is a selector trained on the auxiliary side's gap closed and
    supplies the objective's auxiliary-gain term.
    """

    def __init__(self, selector: Selector, grams: GramTable, features: pl.DataFrame,
                 aux_selector: Selector | None = None) -> None:
        self.selector = selector
        self.aux_selector = aux_selector
        self.grams = grams
        self.operators = list(selector.operators)
        names = list(selector.feature_names)
        for extra in (aux_selector.feature_names if aux_selector else []):
            if extra not in names:
                names.append(extra)
        selector.check_schema(features.columns, "feature table")
        self.names = names
        self.proxy_cols = [n for n in names if n.startswith(PROXY_PREFIXES) or not n.startswith("s_")]
        self.lookup = PairLookup(features, self.proxy_cols)

    def start(self, expert: str) -> MergeState:
        return initial_state(self.grams, expert)

    def extend(self, state: MergeState, model: str, op: str) -> MergeState:
        return step_state(self.grams, state, model, op)

    def features(self, states: Sequence[MergeState], nexts: Sequence[str], task: str) -> np.ndarray:
        """[n, len(self.names)]: exact structural columns, mixture proxies for the rest."""
        states, nexts = list(states), list(nexts)
        exact = structural_features(self.grams, states, nexts)
        proxy = proxy_features(self.lookup, states, nexts, task)
        x = np.empty((len(states), len(self.names)))
        for j, name in enumerate(self.names):
            x[:, j] = proxy[:, self.proxy_cols.index(name)] if name in self.proxy_cols else exact[name]
        return x

    def plan_inputs(self, models: Sequence[str], operators: Sequence[str], task: str) -> np.ndarray:
        """The selector's input row of each step of a plan, replayed: [steps, selector features]."""
        state = self.start(models[0])
        rows = []
        for nxt, op in zip(models[1:], operators):
            rows.append(self.features([state], [nxt], task)[0])
            state = self.extend(state, nxt, op)
        return np.stack(rows)[:, [self.names.index(n) for n in self.selector.feature_names]]

    def step_utilities(self, states: Sequence[MergeState], nexts: Sequence[str], task: str
                       ) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.features(states, nexts, task)
        tasks = [task] * len(x)
        cols = [self.names.index(n) for n in self.selector.feature_names]
        u = self.selector.predict(x[:, cols], tasks)
        v = None
        if self.aux_selector is not None:
            cols = [self.names.index(n) for n in self.aux_selector.feature_names]
            v = self.aux_selector.predict(x[:, cols], tasks)
        return u, v
