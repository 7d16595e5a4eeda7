"""Features of intermediate merges that are never built.

A linear or SLERP merge is, tensor by tensor, a linear combination of catalog models, so an
intermediate `M_j` is a coefficient matrix C[t, r] over the catalog's rows (models, then the
base) and its inner products with any model follow from the per-tensor Gram matrices:
<M, x_r> = (G_t C_t)_r and <M, M> = C_t' G_t C_t. From those the structural features are the
same functions the structural pass uses (exact; TIES uses the linear formula as its proxy).
Functional features and sign agreement cannot be derived from Grams: they are propagated as the
mixture bound / convex combination of the components' values (METHOD.md), with the mixture
weights of the fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.features.gram_math import FEATURES, PairStats, basis_change, pair_features
from simmerge_ray.features.module_groups import GROUPS, THIRDS
from simmerge_ray.features.schema import FUNCTIONAL_PREFIX, KEY_COLUMNS
from simmerge_ray.merge.operators.slerp import slerp_coefficients_from_gram
from simmerge_ray.merge.arms import Arm, get_arm
from simmerge_ray.planner.gram_file import gram_files, read_gram_meta, read_grams

PROXY_PREFIXES = (FUNCTIONAL_PREFIX, "s_sign_agree")


@dataclass(frozen=True)
class GramTable:
    """Per-tensor raw Gram matrices of a catalog, stacked: gram[t] is (R, R)."""

    rows: list[str]  # models in catalog order, then the base if any
    models: list[str]
    base: str | None
    tensors: list[str]
    gram: np.ndarray  # [T, R, R] float64
    scopes: dict[str, np.ndarray]  # column suffix -> boolean mask over tensors

    @classmethod
    def load(cls, features_dir: str | Path) -> "GramTable":
        """The folder's Gram matrices, checked against gram_meta.json (see planner/gram_file.py)."""
        meta_path, gram_path = gram_files(Path(features_dir))
        meta = read_gram_meta(meta_path)
        gram = read_grams(gram_path, meta.tensors, len(meta.rows))
        scopes = {"": np.ones(len(meta.tensors), bool)}
        for g in GROUPS:
            scopes[f"_{g}"] = np.array([group == g for group in meta.groups], bool)
        for k in THIRDS:
            scopes[f"_d{k}"] = np.array([third == k for third in meta.thirds], bool)
        return cls(meta.rows, meta.models, meta.base, meta.tensors, gram, scopes)

    def index(self, model: str) -> int:
        try:
            return self.rows.index(model)
        except ValueError:
            raise ConfigError(f"model {model!r} has no Gram matrices (catalog of the features: "
                              f"{', '.join(self.models)})") from None


@dataclass(frozen=True)
class MergeState:
    """An intermediate merge: per-tensor coefficients over catalog rows and mixture weights."""

    coef: np.ndarray  # [T, R]
    mix: dict[str, float]  # component model -> weight in the fold (sums to 1)


def initial_state(gt: GramTable, model: str) -> MergeState:
    coef = np.zeros((len(gt.tensors), len(gt.rows)))
    coef[:, gt.index(model)] = 1.0
    return MergeState(coef, {model: 1.0})


def step_state(gt: GramTable, state: MergeState, model: str, arm: Arm | str) -> MergeState:
    """The coefficients of arm(state, model): an Arm (a weighted step's, at its share) or a name."""
    r = gt.index(model)
    e = np.zeros(len(gt.rows))
    e[r] = 1.0
    arm = get_arm(arm) if isinstance(arm, str) else arm
    op = arm.name
    form = arm.linear_form()
    if form is None:  # SLERP: coefficients from each tensor's angle, exact from the Gram matrices
        t = float(arm.params["t"])
        gc = np.einsum("trs,ts->tr", gt.gram, state.coef)
        g00 = np.einsum("tr,tr->t", state.coef, gc)
        g01 = gc[:, r]
        g11 = gt.gram[:, r, r]
        c = np.array([slerp_coefficients_from_gram(t, a, b, ab) for a, b, ab in zip(g00, g11, g01)])
        coef = c[:, :1] * state.coef + c[:, 1:] * e
        w_new = t
    else:
        # exact for linear and task arithmetic; sparsified arms (TIES & co) take the dense
        # task-arithmetic combination with their weights as a proxy
        a, b, c_base = form
        coef = a * state.coef + b * e
        if c_base:
            if gt.base is None:
                raise ConfigError(f"step arm {op!r} needs the catalog's base model")
            coef[:, len(gt.rows) - 1] += c_base
        w_new = b / (a + b) if a + b else 0.5
    mix = {k: v * (1 - w_new) for k, v in state.mix.items()}
    mix[model] = mix.get(model, 0.0) + w_new
    return MergeState(coef, mix)


def structural_features(gt: GramTable, states: list[MergeState], others: list[str]) -> dict[str, np.ndarray]:
    """Exact weight-space features of (state_i as a, others_i as b) for every i: s_* columns."""
    n = len(states)
    rows = np.array([gt.index(m) for m in others])
    coef = np.stack([s.coef for s in states])  # [n, T, R]
    gc = np.einsum("trs,nts->ntr", gt.gram, coef)  # <M, x_r> per tensor
    vv = np.einsum("ntr,ntr->nt", coef, gc)
    vm = gc[np.arange(n), :, rows]  # [n, T]
    mm = gt.gram[:, rows, rows].T  # [n, T]
    has_base = gt.base is not None
    if has_base:
        bi = len(gt.rows) - 1
        vb = gc[:, :, bi]
        mb = gt.gram[:, rows, bi].T
        bb = np.broadcast_to(gt.gram[:, bi, bi], (n, len(gt.tensors)))
    out: dict[str, np.ndarray] = {}
    k = 3 if has_base else 2
    ref = 2 if has_base else 0
    tinv = np.linalg.inv(basis_change(k, ref))
    for suffix, mask in gt.scopes.items():
        if not mask.any():
            for f in FEATURES:
                out[f"s_{f}{suffix}"] = np.full(n, np.nan)
            continue
        raw = np.zeros((n, k, k))
        raw[:, 0, 0] = vv[:, mask].sum(1)
        raw[:, 1, 1] = mm[:, mask].sum(1)
        raw[:, 0, 1] = raw[:, 1, 0] = vm[:, mask].sum(1)
        if has_base:
            raw[:, 2, 2] = bb[:, mask].sum(1)
            raw[:, 0, 2] = raw[:, 2, 0] = vb[:, mask].sum(1)
            raw[:, 1, 2] = raw[:, 2, 1] = mb[:, mask].sum(1)
        cols = {f: np.empty(n) for f in FEATURES}
        zero = np.zeros((k, k), np.int64)
        for i in range(n):
            centred = tinv @ raw[i] @ tinv.T
            feats = pair_features(PairStats(centred, zero, zero), ref, 2, has_base)
            for f in FEATURES:
                cols[f][i] = feats[f][0, 1]
        for f in FEATURES:
            out[f"s_{f}{suffix}"] = cols[f]
    return out


class PairLookup:
    """Feature rows of catalog pairs (a, b, task), for the proxy (mixture) features."""

    def __init__(self, features: pl.DataFrame, columns: list[str]) -> None:
        self.columns = columns
        keys = features.select(KEY_COLUMNS).rows()
        self._rows = {k: i for i, k in enumerate(keys)}
        self._x = features.select(columns).to_numpy().astype(np.float64) if columns else np.zeros((len(keys), 0))

    def get(self, a: str, b: str, task: str) -> np.ndarray:
        try:
            return self._x[self._rows[(a, b, task)]]
        except KeyError:
            raise ConfigError(f"features missing for pair ({a!r}, {b!r}) on task {task!r}: "
                              f"compute features for the whole catalog") from None


def proxy_features(lookup: PairLookup, states: list[MergeState], others: list[str], task: str) -> np.ndarray:
    """Mixture-weighted features: KL(sum w_i p_i || q) <= sum w_i KL(p_i || q) (joint convexity),
    convex combinations for cosines and sign agreement. [n, len(lookup.columns)]."""
    out = np.zeros((len(states), len(lookup.columns)))
    for i, (s, m) in enumerate(zip(states, others)):
        for comp, w in s.mix.items():
            out[i] += w * lookup.get(comp, m, task)
    return out
