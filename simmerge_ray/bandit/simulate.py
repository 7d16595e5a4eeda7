"""Replay simulator: how much reward (the two-sided utility) a policy loses against the oracle,
round by round.

The labels give, for each (task, expert, aux), the measured utility of every operator (full
information), so any policy can be replayed: each round draws a context from held-out pairs,
the policy picks an operator, its reward is the measured utility of that operator, and the
regret is the oracle's reward (best available operator) minus it. Policies:

- bandit: Linear Thompson sampling warm-started on the training pairs (offline data), its prior
  mean the offline selector's head when the encoder is the selector;
- bandit_cold: the same with no offline data;
- greedy_offline: the offline selector's argmax, never updated (default selector: the
  posterior-mean regression fitted on the training pairs; any [n, k] predictor plugs in);
- best_fixed: the operator with the best mean on the training pairs;
- uniform: a uniformly random operator.

A second run adds an operator (arm) at round k: before it the policies and the oracle only see
the initial operators; the bandits then add it with a pooled prior, the offline policies cannot
use it (they were fitted before it existed) and uniform draws from all.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from simmerge_ray.errors import ConfigError
from simmerge_ray.bandit.encoder import Encoder, IdentityEncoder
from simmerge_ray.features.schema import KEY_COLUMNS, check_features_cover, feature_columns
from simmerge_ray.bandit.lints import LinTS, LinTSConfig
from simmerge_ray.io.atomic import atomic_write_text
from simmerge_ray.io.tables import LABEL_KEYS

POLICIES = ("bandit", "bandit_cold", "greedy_offline", "best_fixed", "uniform")

OfflinePredictor = Callable[[np.ndarray], np.ndarray]  # raw x [n, d] -> utilities [n, k]


def float_columns(df: pl.DataFrame, names: Sequence[str]) -> np.ndarray:
    """The columns `names` as float64, a null read as NaN (an undefined feature: the encoder
    imputes it)."""
    return df.select(names).cast(pl.Float64).fill_null(float("nan")).to_numpy()


@dataclass(frozen=True)
class ReplayData:
    """Contexts with their raw features and the measured reward of every operator."""

    keys: list[tuple[str, str, str]]  # (task, expert, aux)
    x: np.ndarray  # [n, d]
    rewards: np.ndarray  # [n, k], NaN where an operator was not measured
    operators: tuple[str, ...]
    feature_names: tuple[str, ...]

    def subset(self, rows: np.ndarray) -> ReplayData:
        return replace(self, keys=[self.keys[i] for i in rows], x=self.x[rows], rewards=self.rewards[rows])


def replay_data(
    labels: pl.DataFrame, features: pl.DataFrame, feature_names: Sequence[str] | None = None,
    reward: str = "utility", source: str = "features",
) -> ReplayData:
    """Join labels (one row per task, expert, aux, operator) with x(expert, aux, task); the
    `reward` column (the two-sided utility by default) is what a played arm earns; `source` names
    the feature table in errors.

    Several rows for one operator (e.g. different params) are averaged.
    """
    missing = [c for c in (*LABEL_KEYS, reward) if c not in labels.columns]
    if missing:
        raise ConfigError(f"labels: missing columns {missing}")
    names = list(feature_names) if feature_names is not None else feature_columns(features)
    if not names:
        raise ConfigError(f"{source}: no numeric columns prefixed s_ or f_")
    lacking = [c for c in (*KEY_COLUMNS, *names) if c not in features.columns]
    if lacking:
        raise ConfigError(f"{source}: missing columns {lacking}")
    check_features_cover(labels, features, source)
    operators = tuple(sorted(labels["operator"].unique().to_list()))
    wide = (
        labels.group_by("task", "expert", "aux", "operator")
        .agg(pl.col(reward).cast(pl.Float64).mean())
        .pivot(on="operator", index=["task", "expert", "aux"], values=reward)
        .sort("task", "expert", "aux")
    )
    joined = wide.join(
        features.select(*KEY_COLUMNS, *names).rename({"a": "expert", "b": "aux"})
        .with_columns(pl.lit(True).alias("_has_x")),
        on=["task", "expert", "aux"],
        how="left",
    )
    if joined["_has_x"].null_count():  # keys that are not names (check_features_cover passes them)
        raise ConfigError(f"{source}: labelled (task, expert, aux) without a feature row; keys must be model names")
    x = float_columns(joined, names)  # NaN: undefined, imputed
    if np.isinf(x).any():
        raise ConfigError(f"{source}: infinite values in the rows used by the labels")
    rewards = float_columns(joined, operators)
    keys = [tuple(r) for r in joined.select("task", "expert", "aux").rows()]
    return ReplayData(keys, x, rewards, operators, tuple(names))


def split_by_pair(data: ReplayData, test_frac: float, seed: int) -> tuple[ReplayData, ReplayData]:
    """Hold out whole unordered model pairs (all tasks, both orders), as the selector does.

    Held-out contexts need every operator measured, since the oracle needs them all.
    """
    if not 0 < test_frac < 1:
        raise ConfigError(f"test fraction must be in (0, 1), got {test_frac}")
    pairs = sorted({tuple(sorted((e, a))) for _, e, a in data.keys})
    if len(pairs) < 2:
        raise ConfigError(f"need at least 2 model pairs to hold some out, got {len(pairs)}")
    rng = np.random.default_rng(seed)
    n_test = min(max(1, round(test_frac * len(pairs))), len(pairs) - 1)
    test_pairs = {pairs[i] for i in rng.choice(len(pairs), size=n_test, replace=False)}
    in_test = np.array([tuple(sorted((e, a))) in test_pairs for _, e, a in data.keys])
    complete = np.isfinite(data.rewards).all(axis=1)
    test_rows = np.flatnonzero(in_test & complete)
    if test_rows.size == 0:
        raise ConfigError("no held-out context has every operator measured")
    return data.subset(np.flatnonzero(~in_test)), data.subset(test_rows)


# ----- policies: choose an operator (global index) for a held-out row, learn from its reward
class Policy(Protocol):
    def choose(self, row: int, available: list[int]) -> int: ...
    def observe(self, row: int, op: int, reward: float) -> None: ...
    def add_operator(self, op: int) -> None: ...


class BanditPolicy:
    def __init__(self, bandit: LinTS, z: np.ndarray, operators: Sequence[str]):
        self.bandit, self.z, self.operators = bandit, z, list(operators)

    def choose(self, row: int, available: list[int]) -> int:
        arm, _ = self.bandit.choose(self.z[row])
        return self.operators.index(self.bandit.arm_names[arm])

    def observe(self, row: int, op: int, reward: float) -> None:
        self.bandit.update(self.operators[op], self.z[row], reward)

    def add_operator(self, op: int) -> None:
        self.bandit.add_arm(self.operators[op], prior_mean=self.bandit.pooled_prior_mean())


class TablePolicy:
    """Argmax of fixed per-row utilities [n, k] over the operators it knows (never learns)."""

    def __init__(self, utilities: np.ndarray, known: list[int]):
        self.utilities, self.known = utilities, known

    def choose(self, row: int, available: list[int]) -> int:
        ops = [o for o in available if o in self.known]
        return ops[int(np.argmax(self.utilities[row, ops]))]

    def observe(self, row: int, op: int, reward: float) -> None:
        pass

    def add_operator(self, op: int) -> None:
        pass


class UniformPolicy:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def choose(self, row: int, available: list[int]) -> int:
        return int(self.rng.choice(available))

    def observe(self, row: int, op: int, reward: float) -> None:
        pass

    def add_operator(self, op: int) -> None:
        pass


@dataclass(frozen=True)
class SimSettings:
    rounds: int = 200
    repeats: int = 20
    seed: int = 0
    checkpoints: tuple[int, ...] = (60, 200)
    bandit: LinTSConfig = LinTSConfig()
    warm_weight: float = 1.0
    fit_evidence: bool = True  # empirical-Bayes prior and noise variances of the warm bandit


def prior_bandit(encoder: Encoder, arms: Sequence[str], config: LinTSConfig) -> LinTS:
    """A bandit before any data: each arm's prior mean is the encoder's own prediction head where it
    has one for that arm (the offline selector's), else zero."""
    bandit = LinTS(encoder.width, (), config)
    head = getattr(encoder, "head_prior", None)
    priors = head(intercept=config.intercept) if head is not None else {}
    for arm in arms:
        bandit.add_arm(arm, priors.get(arm))
    return bandit


def warm_bandit(encoder: Encoder, arms: Sequence[str], z: np.ndarray, rewards: np.ndarray,
                settings: SimSettings) -> LinTS:
    """The warm-started bandit: each arm's prior mean is the encoder's own prediction head where it
    has one (the offline selector's), then the offline rows are absorbed and, with
    `settings.fit_evidence`, the prior and noise variances are chosen by their evidence."""
    bandit = prior_bandit(encoder, arms, settings.bandit)
    bandit.warm_start(z, rewards, weight=settings.warm_weight)
    if settings.fit_evidence:
        bandit.fit_evidence()
    return bandit


def simulate(
    train: ReplayData,
    test: ReplayData,
    settings: SimSettings = SimSettings(),
    *,
    encoder: Encoder | None = None,
    offline_predict: OfflinePredictor | None = None,
    new_operator: str | None = None,
    add_at: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay every policy `repeats` times over the same drawn contexts; summarise the regret.

    With `new_operator`, that operator is hidden for the first `add_at` rounds (and from the
    offline data). `progress(done, repeats)` is called after each repeat.
    """
    ops = list(test.operators)
    if train.operators != test.operators:
        raise ConfigError("train and test operators differ")
    if new_operator is not None:
        _check_addition(ops, new_operator, add_at, settings.rounds)
    if settings.rounds < 1 or settings.repeats < 1:
        raise ConfigError("rounds and repeats must be >= 1")
    initial = [i for i, o in enumerate(ops) if o != new_operator]
    encoder = encoder or IdentityEncoder.fit(train.feature_names, train.x)
    z_train, z_test = encoder.encode(train.x), encoder.encode(test.x)

    warm = warm_bandit(encoder, [ops[i] for i in initial], z_train, train.rewards[:, initial], settings)
    if offline_predict is None:
        offline = np.full((len(test.keys), len(ops)), -np.inf)
        offline[:, initial] = warm.mean_scores(z_test)
    else:
        offline = np.asarray(offline_predict(test.x), dtype=np.float64)
        if offline.shape != (len(test.keys), len(ops)):
            want = (len(test.keys), len(ops))
            raise ConfigError(f"offline predictor: expected shape {want}, got {offline.shape}")
    measured = np.isfinite(train.rewards)
    counts = measured.sum(axis=0)
    train_means = np.where(counts > 0, np.nansum(train.rewards, axis=0) / np.maximum(counts, 1), -np.inf)
    fixed = np.tile(train_means, (len(test.keys), 1))

    cold = LinTS(encoder.width, [ops[i] for i in initial], settings.bandit)
    for bandit in (warm, cold):  # posteriors solved once here and copied into each repeat
        bandit.incremental = True  # rank-one posterior updates: O(p^2) a round, not O(p^3)
        bandit.mean_scores(z_test[:1])
    # the oracle's reward of each row, before and after the addition
    oracle_initial, oracle_all = (np.max(test.rewards[:, i], axis=1).tolist() for i in (initial, slice(None)))
    regret = {name: np.zeros((settings.repeats, settings.rounds)) for name in POLICIES}
    picks = {name: np.zeros((settings.repeats, settings.rounds), dtype=np.int64) for name in POLICIES}
    for rep in range(settings.repeats):
        rows = np.random.default_rng([settings.seed, rep]).integers(len(test.keys), size=settings.rounds)
        warm_rep = copy.deepcopy(warm)
        cold_rep = copy.deepcopy(cold)
        for bandit in (warm_rep, cold_rep):  # common random numbers across the two bandits
            bandit.rng = np.random.default_rng([settings.seed, rep, 2])
        policies: dict[str, Policy] = {
            "bandit": BanditPolicy(warm_rep, z_test, ops),
            "bandit_cold": BanditPolicy(cold_rep, z_test, ops),
            "greedy_offline": TablePolicy(offline, initial),
            "best_fixed": TablePolicy(fixed, initial),
            "uniform": UniformPolicy(np.random.default_rng([settings.seed, rep, 1])),
        }
        for name, policy in policies.items():
            available, best = list(initial), oracle_initial
            for t, row in enumerate(rows.tolist()):
                if new_operator is not None and t == add_at:
                    available, best = list(range(len(ops))), oracle_all
                    policy.add_operator(ops.index(new_operator))
                op = policy.choose(row, available)
                reward = float(test.rewards[row, op])
                policy.observe(row, op, reward)
                regret[name][rep, t] = best[row] - reward
                picks[name][rep, t] = op
        if progress is not None:
            progress(rep + 1, settings.repeats)
    return _summary(regret, picks, ops, settings, new_operator, add_at, len(train.keys), len(test.keys))


def _check_addition(ops: Sequence[str], new_operator: str, add_at: int | None, rounds: int) -> None:
    """The operator to add is one of `ops`, added at a round of the replay."""
    if new_operator not in ops:
        raise ConfigError(f"unknown operator to add {new_operator!r} (have {list(ops)})")
    if add_at is None or not 0 <= add_at < rounds:
        raise ConfigError(f"add-at round must be in [0, {rounds}), got {add_at}")


def most_often_best(train: ReplayData) -> str:
    """The operator that wins the most complete training contexts: holding back the usual winner is
    the hardest case for a policy, and the choice never looks at held-out rewards."""
    complete = np.isfinite(train.rewards).all(axis=1)
    wins = np.bincount(np.argmax(train.rewards[complete], axis=1), minlength=len(train.operators))
    return train.operators[int(np.argmax(wins))]


def replay_adding(
    train: ReplayData,
    test: ReplayData,
    settings: SimSettings,
    *,
    add_at: int,
    new_operator: str | None = None,
    encoder: Encoder | None = None,
    offline_predict: OfflinePredictor | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two replays over the same draws: every operator from the start, then `new_operator`
    (default: `most_often_best`) held back until round `add_at`. `progress(replay, done, repeats)`
    is called after each repeat of each replay."""
    new_operator = new_operator or most_often_best(train)
    _check_addition(train.operators, new_operator, add_at, settings.rounds)  # before the first replay's work
    def told(replay: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(replay, done, total))

    every = simulate(train, test, settings, encoder=encoder, offline_predict=offline_predict,
                     progress=told("all_operators"))
    added = simulate(train, test, settings, encoder=encoder, offline_predict=offline_predict,
                     new_operator=new_operator, add_at=add_at, progress=told("operator_added"))
    return every, added


def _summary(
    regret: dict[str, np.ndarray],
    picks: dict[str, np.ndarray],
    ops: list[str],
    settings: SimSettings,
    new_operator: str | None,
    add_at: int | None,
    n_train: int,
    n_test: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rounds": settings.rounds,
        "repeats": settings.repeats,
        "seed": settings.seed,
        "operators": ops,
        "n_train_contexts": n_train,
        "n_test_contexts": n_test,
        "new_operator": new_operator,
        "add_at": add_at,
        "policies": {},
    }
    checkpoints = sorted({c for c in settings.checkpoints if c <= settings.rounds} | {settings.rounds})
    for name, r in regret.items():
        cum = np.cumsum(r, axis=1)
        entry: dict[str, Any] = {
            "cum_regret_mean": cum.mean(axis=0).tolist(),
            "cum_regret_std": cum.std(axis=0).tolist(),
            "at": {str(c): {"mean": float(cum[:, c - 1].mean()), "std": float(cum[:, c - 1].std())}
                   for c in checkpoints},
            "oracle_pick_rate": float((r == 0).mean()),
            "pick_share": {op: float((picks[name] == i).mean()) for i, op in enumerate(ops)},
        }
        if new_operator is not None:
            after = picks[name][:, add_at:]
            entry["new_operator_share_after_add"] = float((after == ops.index(new_operator)).mean())
        out["policies"][name] = entry
    return out


def write_report(results: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """regret.json (all runs) and regret.png (one panel per run) into an existing folder."""
    from simmerge_ray.report.charts import regret_chart

    atomic_write_text(out_dir / "regret.json", json.dumps(results, indent=2) + "\n")
    regret_chart(results, out_dir / "regret.png")
