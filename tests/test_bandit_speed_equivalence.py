"""The replay simulator's fast path gives the results of the straightforward computation.

`simulate` runs its bandits with `incremental = True` (rank-one Sherman-Morrison posterior
updates instead of an eigendecomposition per update), solves the cold and warm posteriors once
rather than once per repeat, and reads the oracle's reward from a per-row table; `fit_evidence`
reuses each factorisation across the grid points that share its ratio a/s. Checked here against:

- a reference LinTS written from the formulas in this file (posterior by matrix inverse);
- a reference replay loop (the loop as it was, on bandits that re-solve after every update);
- picks and regret recorded from the code before the fast path (literals below).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import simmerge_ray.bandit.simulate as sim
from simmerge_ray.bandit.errors import NonFiniteUpdateError
from simmerge_ray.bandit import lints
from simmerge_ray.bandit.lints import LinTS, LinTSConfig
from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables


class ReferenceLinTS:
    """One Bayesian linear regression per arm, its posterior re-derived from the formulas:
    cov = (I / prior_var + G / noise_var)^-1, mean = cov (m / prior_var + X^T r / noise_var)."""

    def __init__(self, bandit: LinTS):
        self.noise_var, self.exploration = bandit.noise_var, bandit.config.exploration
        self.rng = copy.deepcopy(bandit.rng)
        self.arms = [(a.prior_mean.copy(), a.prior_var, a.gram.copy(), a.zr.copy()) for a in bandit.arms]

    def posterior(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        m, a, g, zr = self.arms[i]
        cov = np.linalg.inv(np.eye(len(m)) / a + g / self.noise_var)
        return cov @ (m / a + zr / self.noise_var), cov

    def choose(self, x: np.ndarray) -> tuple[int, np.ndarray]:
        mu, sd = np.empty(len(self.arms)), np.empty(len(self.arms))
        for i in range(len(self.arms)):
            mean, cov = self.posterior(i)
            mu[i], sd[i] = x @ mean, np.sqrt(max(x @ cov @ x, 0.0))
        draws = mu + self.exploration * sd * self.rng.standard_normal(len(self.arms))
        return int(np.argmax(draws)), draws

    def update(self, i: int, x: np.ndarray, r: float) -> None:
        m, a, g, zr = self.arms[i]
        self.arms[i] = (m, a, g + np.outer(x, x), zr + x * r)


def _warm(width: int = 12, k: int = 4, n: int = 40, seed: int = 0) -> tuple[LinTS, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n + 60, width))
    w = rng.normal(size=(width + 1, k))
    r = np.c_[z, np.ones(len(z))] @ w + 0.1 * rng.normal(size=(len(z), k))
    bandit = LinTS(width, [f"op{i}" for i in range(k)], LinTSConfig(seed=seed))
    bandit.warm_start(z[:n], r[:n])
    return bandit, z[n:], r[n:]


@pytest.mark.parametrize("incremental", [False, True])
def test_lints_matches_the_formulas_decision_by_decision(incremental: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(lints, "REFRESH_EVERY", 7)  # several exact refreshes within the run
    bandit, z, r = _warm()
    ref = ReferenceLinTS(bandit)
    bandit.incremental = incremental
    solves = []
    monkeypatch.setattr(bandit, "_solve", lambda arm: (solves.append(arm.name), LinTS._solve(bandit, arm))[1])
    for t in range(300):
        row = t % len(z)
        x = bandit.design(z[row])[0]
        arm, draws = bandit.choose(z[row])
        want_arm, want_draws = ref.choose(x)
        assert arm == want_arm
        np.testing.assert_allclose(draws, want_draws, rtol=1e-9, atol=1e-12)
        bandit.update(arm, z[row], float(r[row, arm]))
        ref.update(arm, x, float(r[row, arm]))
    for i in range(len(bandit.arms)):
        mean, cov = bandit.posterior(i)
        want_mean, want_cov = ref.posterior(i)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(cov, want_cov, rtol=1e-9, atol=1e-12)
    plays = [a.plays for a in bandit.arms]
    # exact: the first look at each arm, then every update; rank-one: one solve in 8 updates
    assert len(solves) == (4 + 300 if not incremental else 4 + sum(n // 8 for n in plays))


def test_an_incremental_arm_without_data_is_its_prior_without_a_solve():
    bandit = LinTS(3, ["a"], LinTSConfig(prior_var=2.0))
    bandit.add_arm("b", prior_mean=np.array([0.1, 0.2, 0.3, 0.4]))
    bandit.incremental = True
    for i, mean in enumerate((np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]))):
        got_mean, got_cov = bandit.posterior(i)
        assert np.array_equal(got_mean, mean) and np.array_equal(got_cov, 2.0 * np.eye(4))
        exact_mean, exact_cov = LinTS._solve(bandit, bandit.arms[i])
        np.testing.assert_allclose(got_mean, exact_mean, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(got_cov, exact_cov, rtol=1e-15, atol=1e-15)


def test_incremental_statistics_and_saved_state_are_those_of_the_exact_path():
    """The rank-one path changes only the in-memory posterior: the statistics (what the state file
    holds) are bit-identical, and the state reloads into the same posterior up to round-off."""
    exact, z, r = _warm(seed=1)
    fast = copy.deepcopy(exact)
    fast.incremental = True
    for t in range(150):
        arm = t % 3
        exact.update(arm, z[t % len(z)], float(r[t % len(z), arm]))
        fast.update(arm, z[t % len(z)], float(r[t % len(z), arm]))
    (meta_e, arrays_e), (meta_f, arrays_f) = exact.to_state(), fast.to_state()
    assert meta_e == meta_f and arrays_e.keys() == arrays_f.keys()
    assert all(np.array_equal(arrays_e[k], arrays_f[k]) for k in arrays_e)
    reloaded = LinTS.from_state(meta_f, arrays_f)
    assert reloaded.incremental is False  # in memory only: a served bandit decides from its state
    for i in range(len(exact.arms)):
        np.testing.assert_allclose(fast.posterior(i)[0], reloaded.posterior(i)[0], rtol=1e-9, atol=1e-12)


def test_incremental_update_refuses_a_non_finite_posterior_and_leaves_the_arm():
    bandit, z, _ = _warm(seed=2)
    bandit.incremental = True
    bandit.update(0, z[0], 0.5)  # rank-one from here on
    before = (copy.deepcopy(bandit.arms[0]), copy.deepcopy(bandit.posterior(0)))
    with pytest.raises(NonFiniteUpdateError, match="non-finite"):
        bandit.update(0, z[1], 1e200)  # r^2 overflows
    assert bandit.arms[0].plays == before[0].plays and np.array_equal(bandit.arms[0].gram, before[0].gram)
    assert all(np.array_equal(a, b) for a, b in zip(bandit.posterior(0), before[1]))


def test_fit_evidence_memo_gives_the_values_of_each_grid_point_alone():
    bandit, _, _ = _warm(seed=3)
    memo: dict = {}
    for a in np.logspace(-6, 1, 22)[::3]:
        for s in np.logspace(-4, 0, 13)[::2]:
            for i in range(len(bandit.arms)):
                assert bandit.log_evidence(i, a, s, memo) == bandit.log_evidence(i, a, s)  # bit for bit


def _replay_inputs():
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=6, n_features=20, seed=3))
    return sim.split_by_pair(sim.replay_data(labels, features), 0.3, seed=0)


def _raw_runs(monkeypatch: pytest.MonkeyPatch, run) -> list[tuple[dict, dict]]:
    """The regret and picks arrays [repeats, rounds] of every policy, of each simulate() in `run`."""
    seen: list[tuple[dict, dict]] = []
    summary = sim._summary
    monkeypatch.setattr(sim, "_summary", lambda regret, picks, *a: (seen.append((regret, picks)),
                                                                     summary(regret, picks, *a))[1])
    run()
    return seen


def _reference_replay(train, test, settings, new_operator=None, add_at=None) -> tuple[dict, dict]:
    """simulate()'s loop as it was: bandits that re-solve their posterior after every update."""
    ops = list(test.operators)
    initial = [i for i, o in enumerate(ops) if o != new_operator]
    encoder = sim.IdentityEncoder.fit(train.feature_names, train.x)
    z_train, z_test = encoder.encode(train.x), encoder.encode(test.x)
    warm = sim.warm_bandit(encoder, [ops[i] for i in initial], z_train, train.rewards[:, initial], settings)
    offline = np.full((len(test.keys), len(ops)), -np.inf)
    offline[:, initial] = warm.mean_scores(z_test)
    counts = np.isfinite(train.rewards).sum(axis=0)
    fixed = np.tile(np.where(counts > 0, np.nansum(train.rewards, axis=0) / np.maximum(counts, 1), -np.inf),
                    (len(test.keys), 1))
    regret = {n: np.zeros((settings.repeats, settings.rounds)) for n in sim.POLICIES}
    picks = {n: np.zeros((settings.repeats, settings.rounds), dtype=np.int64) for n in sim.POLICIES}
    for rep in range(settings.repeats):
        rows = np.random.default_rng([settings.seed, rep]).integers(len(test.keys), size=settings.rounds)
        warm_rep, cold_rep = copy.deepcopy(warm), LinTS(encoder.width, [ops[i] for i in initial], settings.bandit)
        for bandit in (warm_rep, cold_rep):
            bandit.rng = np.random.default_rng([settings.seed, rep, 2])
        policies = {"bandit": sim.BanditPolicy(warm_rep, z_test, ops),
                    "bandit_cold": sim.BanditPolicy(cold_rep, z_test, ops),
                    "greedy_offline": sim.TablePolicy(offline, initial), "best_fixed": sim.TablePolicy(fixed, initial),
                    "uniform": sim.UniformPolicy(np.random.default_rng([settings.seed, rep, 1]))}
        for name, policy in policies.items():
            available = list(initial)
            for t, row in enumerate(rows):
                if new_operator is not None and t == add_at:
                    available = list(range(len(ops)))
                    policy.add_operator(ops.index(new_operator))
                op = policy.choose(int(row), available)
                reward = float(test.rewards[row, op])
                policy.observe(int(row), op, reward)
                regret[name][rep, t] = float(np.max(test.rewards[row, available])) - reward
                picks[name][rep, t] = op
    return regret, picks


def test_simulate_gives_the_reference_loops_regret_and_picks_bit_for_bit(monkeypatch: pytest.MonkeyPatch):
    train, test = _replay_inputs()
    settings = sim.SimSettings(rounds=60, repeats=2, seed=0)
    new = sim.most_often_best(train)
    runs = _raw_runs(monkeypatch, lambda: sim.replay_adding(train, test, settings, add_at=20))
    want = [_reference_replay(train, test, settings), _reference_replay(train, test, settings, new, 20)]
    for (regret, picks), (want_regret, want_picks) in zip(runs, want, strict=True):
        for name in sim.POLICIES:
            assert np.array_equal(picks[name], want_picks[name]), name
            assert np.array_equal(regret[name], want_regret[name]), name  # oracle minus a table value: exact


# Recorded from the code before the fast path (every update re-solved by eigendecomposition):
# the bandits' picks (operator indices, one string per repeat) and their regret per repeat.
GOLDEN = {
    "every": {
        "bandit": (["323112222122302020001122130200320323212112202232100122121222",
                    "322011322223101220202220313022212021122301322131310123110300"],
                   [0.2131142061487737, 0.19453829328799466]),
        "bandit_cold": (["102033110000100020200311321112010322002332202201200130030002",
                         "212130232002210221131231333331300031103333303132000013120212"],
                        [43.35790702912289, 39.890071993235864]),
    },
    "added": {
        "bandit": (["313111313113300010001131132122320323322212202321100122121202",
                    "330011303333101110000100223222212221121201322221320123120300"],
                   [11.85650875559928, 7.925345391593918]),
        "bandit_cold": (["113101131031003001331301002122321123023032202121033112021202",
                         "330110303311000133333111213222222211001211022223321133220100"],
                        [36.70886584008207, 31.039646461003027]),
    },
}


def test_simulate_gives_the_recorded_picks_and_regret(monkeypatch: pytest.MonkeyPatch):
    train, test = _replay_inputs()
    runs = _raw_runs(monkeypatch, lambda: sim.replay_adding(train, test, sim.SimSettings(rounds=60, repeats=2, seed=0),
                                                            add_at=20))
    for (regret, picks), replay in zip(runs, ("every", "added"), strict=True):
        for name, (want_picks, want_regret) in GOLDEN[replay].items():
            assert ["".join(map(str, row)) for row in picks[name]] == want_picks, (replay, name)
            # Not bit for bit: the replay's reward tables come from matrix products whose last bits
            # follow the CPU's SIMD width (recorded with AVX-512; an AVX2 core differs by ulps).
            assert regret[name].sum(axis=1).tolist() == pytest.approx(want_regret, rel=1e-12, abs=0), (replay, name)
