"""The step model of the planner: the pairwise selector applied to propagated features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.merge.arms import Arm
from simmerge_ray.planner.propagate import (
    PROXY_PREFIXES, GramTable, MergeState, PairLookup, initial_state, proxy_features, step_state,
    structural_features,
)
from simmerge_ray.selector.model import Selector


class SelectorStepModel:
    """Scores (merge so far, next model) steps with a trained selector, never building merges.

    `aux_selector`, when given, is a selector trained on the auxiliary side's gap closed: it
    predicts what the joining model keeps. The step's GapClosed on the merge-so-far side is the
    selector's own prediction for a gap_closed selector, and 2 U - V for a two-sided utility
    selector (U = (GapClosed + auxiliary GapClosed) / 2); a utility selector without its
    auxiliary twin, or a joining model without a task, gives U itself, a proxy.
    """

    def __init__(self, selector: Selector, grams: GramTable, features: pl.DataFrame,
                 aux_selector: Selector | None = None) -> None:
        self.selector = selector
        self.aux_selector = aux_selector
        self.grams = grams
        self.operators = list(selector.operators)
        if aux_selector is not None and list(aux_selector.operators) != self.operators:
            raise ConfigError(f"the auxiliary selector predicts arms {list(aux_selector.operators)}, the selector "
                              f"{self.operators}: fit both on the same labels")
        self.two_sided = selector.meta.get("target") == "utility" and aux_selector is not None
        names = list(selector.feature_names)
        for extra in (aux_selector.feature_names if aux_selector else []):
            if extra not in names:
                names.append(extra)
        selector.check_schema(features.columns, "feature table")
        self.names = names
        self.proxy_cols = [n for n in names if n.startswith(PROXY_PREFIXES) or not n.startswith("s_")]
        self.lookup = PairLookup(features, self.proxy_cols)

    @property
    def has_aux(self) -> bool:
        return self.aux_selector is not None

    def start(self, model: str) -> MergeState:
        return initial_state(self.grams, model)

    def extend(self, state: MergeState, model: str, arm: Arm | str) -> MergeState:
        return step_state(self.grams, state, model, arm)

    def features(self, states: Sequence[MergeState], nexts: Sequence[str], task: str) -> np.ndarray:
        """[n, len(self.names)]: exact structural columns, mixture proxies for the rest."""
        states, nexts = list(states), list(nexts)
        exact = structural_features(self.grams, states, nexts)
        proxy = proxy_features(self.lookup, states, nexts, task)
        x = np.empty((len(states), len(self.names)))
        for j, name in enumerate(self.names):
            x[:, j] = proxy[:, self.proxy_cols.index(name)] if name in self.proxy_cols else exact[name]
        return x

    def plan_inputs(self, models: Sequence[str], arms: Sequence[Arm], task: str) -> np.ndarray:
        """The selector's input row of each step of a plan, replayed: [steps, selector features]."""
        state = self.start(models[0])
        rows = []
        for nxt, arm in zip(models[1:], arms):
            rows.append(self.features([state], [nxt], task)[0])
            state = self.extend(state, nxt, arm)
        return np.stack(rows)[:, [self.names.index(n) for n in self.selector.feature_names]]

    def step_utilities(self, states: Sequence[MergeState], nexts: Sequence[str], task: str,
                       joining_tasks: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """`joining_tasks`: each next model's own task (None: every one has one). A model without a
        task has no auxiliary side, so no label ever measured V for it: there the merge side is
        U itself, the proxy, not 2 U - V."""
        x = self.features(states, nexts, task)
        tasks = [task] * len(x)
        cols = [self.names.index(n) for n in self.selector.feature_names]
        u = self.selector.predict(x[:, cols], tasks)
        v = None
        if self.aux_selector is not None:
            cols = [self.names.index(n) for n in self.aux_selector.feature_names]
            v = self.aux_selector.predict(x[:, cols], tasks)
            if self.two_sided:
                has_task = np.ones(len(u), bool) if joining_tasks is None else \
                    np.array([t is not None for t in joining_tasks], bool)
                u = np.where(has_task[:, None], 2 * u - v, u)
        return u, v
