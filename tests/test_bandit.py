"""The bandit without Ray: LinTS math, encoder, state file, decision ledger, replay simulator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from simmerge_ray.bandit.calls import Call
from simmerge_ray.bandit.core import BanditCore
from simmerge_ray.bandit.encoder import IdentityEncoder, load_encoder
from simmerge_ray.bandit.errors import (
    BanditError,
    DuplicateArmError,
    FeatureError,
    NonFiniteStateError,
    NonFiniteUpdateError,
    RewardError,
    UnknownDecisionError,
    UnknownNameError,
)
from simmerge_ray.bandit.feature_table import FeatureTable
from simmerge_ray.bandit.limits import FEATURE_BOUND, REWARD_BOUND
from simmerge_ray.bandit.lints import LinTS, LinTSConfig
from simmerge_ray.bandit.simulate import SimSettings, most_often_best, replay_data, simulate, split_by_pair, warm_bandit
from simmerge_ray.bandit.state import SETTINGS_FILE, STATE_FILE, read_state, write_state
from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError, ConfigError


def _linear_data(n: int, width: int, k: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, width))
    w = rng.normal(size=(width + 1, k))
    r = np.c_[z, np.ones(n)] @ w + noise * rng.normal(size=(n, k))
    return z, r, w


# ----- LinTS math
def test_posterior_is_the_bayesian_ridge_solution():
    cfg = LinTSConfig(noise_var=0.5, prior_var=2.0)
    z, r, _ = _linear_data(30, 3, 1, 0.3)
    bandit = LinTS(3, ["a"], cfg)
    for zi, ri in zip(z, r[:, 0]):
        bandit.update("a", zi, ri)
    x = np.c_[z, np.ones(30)]
    precision = np.eye(4) / 2.0 + x.T @ x / 0.5
    mean, cov = bandit.posterior(0)
    np.testing.assert_allclose(cov, np.linalg.inv(precision), rtol=1e-10)
    np.testing.assert_allclose(mean, np.linalg.solve(precision, x.T @ r[:, 0] / 0.5), rtol=1e-10)
    assert bandit.arms[0].plays == 30


def test_warm_start_equals_sequential_updates_and_skips_missing_rewards():
    z, r, _ = _linear_data(40, 4, 2, 0.1)
    r[::5, 1] = np.nan
    batched = LinTS(4, ["a", "b"])
    batched.warm_start(z, r, fit_noise=False)
    sequential = LinTS(4, ["a", "b"])
    for zi, ri in zip(z, r):
        for arm, value in zip(["a", "b"], ri):
            if np.isfinite(value):
                sequential.update(arm, zi, value)
    for i in range(2):
        np.testing.assert_allclose(batched.posterior(i)[0], sequential.posterior(i)[0], rtol=1e-9)
        np.testing.assert_allclose(batched.posterior(i)[1], sequential.posterior(i)[1], rtol=1e-9)
    assert batched.arms[1].weight == 32  # 8 of 40 rewards missing
    assert batched.arms[0].plays == 0  # offline data is not online play


def test_warm_start_fits_the_noise_variance():
    z, r, _ = _linear_data(3000, 5, 3, noise=0.2, seed=1)
    bandit = LinTS(5, ["a", "b", "c"])
    bandit.warm_start(z, r)
    assert bandit.noise_var == pytest.approx(0.04, rel=0.1)


def test_log_evidence_is_the_gaussian_marginal_likelihood():
    """The Woodbury form from sufficient statistics equals the n x n Gaussian density directly."""
    z, r, _ = _linear_data(25, 3, 1, 0.2, seed=4)
    m = np.array([0.3, -0.2, 0.1, 0.5])
    bandit = LinTS(3, [], LinTSConfig())
    bandit.add_arm("a", m, 1.0)
    bandit.warm_start(z, r, fit_noise=False)
    x = np.c_[z, np.ones(25)]
    for a, s in ((0.7, 0.05), (0.01, 0.3)):
        cov = s * np.eye(25) + a * x @ x.T
        d = r[:, 0] - x @ m
        direct = -0.5 * (25 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d))
        assert bandit.log_evidence(0, a, s) == pytest.approx(direct, rel=1e-9)


def test_fit_evidence_shrinks_towards_a_right_prior_and_recovers_the_noise():
    """Rewards made exactly by the prior mean's weights want a tiny prior variance; the same rows
    against a zero prior want a large one. The noise variance comes out near the true 0.04."""
    z, r, w = _linear_data(300, 4, 2, 0.2, seed=5)
    grid = dict(prior_vars=np.logspace(-6, 1, 22), noise_vars=np.logspace(-3, 0, 31))
    right = LinTS(4, [], LinTSConfig())
    for i in range(2):
        right.add_arm(f"a{i}", w[:, i])
    right.warm_start(z, r, fit_noise=False)
    prior_right, noise_right = right.fit_evidence(**grid)
    zero = LinTS(4, ["a0", "a1"], LinTSConfig())
    zero.warm_start(z, r, fit_noise=False)
    prior_zero, noise_zero = zero.fit_evidence(**grid)
    assert prior_right <= 1e-4 < 0.1 <= prior_zero
    assert 0.03 < noise_right < 0.055 and 0.03 < noise_zero < 0.055
    assert right.noise_var == noise_right and all(a.prior_var == prior_right for a in right.arms)
    with pytest.raises(ConfigError, match="no absorbed rows"):
        LinTS(4, ["a"], LinTSConfig()).fit_evidence()


def test_thompson_draws_follow_the_posterior_marginal():
    z, r, _ = _linear_data(20, 2, 2, 0.3)
    bandit = LinTS(2, ["a", "b"], LinTSConfig(seed=3))
    bandit.warm_start(z, r, fit_noise=False)
    ctx = np.array([0.5, -1.0])
    draws = np.array([bandit.sample_scores(ctx) for _ in range(8000)])
    x = np.array([0.5, -1.0, 1.0])
    for i in range(2):
        mean, cov = bandit.posterior(i)
        assert draws[:, i].mean() == pytest.approx(x @ mean, abs=4 * np.sqrt(x @ cov @ x / 8000))
        assert draws[:, i].var() == pytest.approx(x @ cov @ x, rel=0.08)


def test_seeded_runs_repeat_and_seeds_differ():
    ctx = np.zeros(3)

    def draws(seed: int) -> np.ndarray:
        bandit = LinTS(3, ["a", "b", "c"], LinTSConfig(seed=seed))
        return np.array([bandit.sample_scores(ctx) for _ in range(5)])

    np.testing.assert_array_equal(draws(7), draws(7))
    assert not np.allclose(draws(7), draws(8))


def test_state_round_trip_resumes_exactly():
    z, r, _ = _linear_data(50, 3, 2, 0.2)
    bandit = LinTS(3, ["a", "b"], LinTSConfig(seed=5))
    bandit.warm_start(z, r)
    bandit.sample_scores(z[0])  # advance the generator
    clone = LinTS.from_state(*bandit.to_state())
    for zi in z[:5]:
        np.testing.assert_array_equal(bandit.sample_scores(zi), clone.sample_scores(zi))
    assert clone.noise_var == bandit.noise_var


def test_added_arm_gets_pooled_prior_and_is_learned_when_best():
    z, r, w = _linear_data(200, 2, 2, 0.05)
    bandit = LinTS(2, ["a", "b"], LinTSConfig(seed=0))
    bandit.warm_start(z, r)
    pooled = bandit.pooled_prior_mean()
    np.testing.assert_allclose(pooled, (bandit.posterior(0)[0] + bandit.posterior(1)[0]) / 2)
    bandit.add_arm("c", prior_mean=pooled)
    np.testing.assert_allclose(bandit.posterior(2)[0], pooled)
    with pytest.raises(DuplicateArmError, match="'c'"):
        bandit.add_arm("c")
    rng = np.random.default_rng(0)
    chosen = []
    for _ in range(150):
        ctx = rng.normal(size=2)
        arm, _ = bandit.choose(ctx)
        true = np.r_[ctx, 1.0] @ w  # within about +-5 here
        reward = 6.0 if arm == 2 else true[arm]  # c is linear too, and the best everywhere
        bandit.update(arm, ctx, reward)
        chosen.append(arm)
    assert np.mean(np.array(chosen[-50:]) == 2) > 0.9


def test_bad_rewards_and_configs_are_refused():
    bandit = LinTS(2, ["a"])
    with pytest.raises(RewardError):
        bandit.update("a", np.zeros(2), float("nan"))
    with pytest.raises(UnknownNameError, match="'zz'"):
        bandit.update("zz", np.zeros(2), 1.0)
    with pytest.raises(ConfigError, match="noise_var"):
        LinTSConfig(noise_var=0.0)
    with pytest.raises(ConfigError, match="rewards shape"):
        bandit.warm_start(np.zeros((3, 2)), np.zeros((3, 2)))


def test_an_update_that_would_make_a_posterior_non_finite_is_refused():
    bandit = LinTS(2, ["a", "b"])
    bandit.update("a", np.array([0.5, -1.0]), 1.0)
    meta, arrays = bandit.to_state()
    posterior = bandit.posterior(0)
    with pytest.raises(NonFiniteUpdateError, match="^reward: learning 1 would make arm 'a'"):
        bandit.update("a", np.array([1e200, 0.0]), 1.0)  # x x^T overflows to Inf
    after_meta, after_arrays = bandit.to_state()
    assert after_meta == meta
    assert all(np.array_equal(arrays[k], after_arrays[k]) for k in arrays)
    assert all(np.array_equal(x, y) for x, y in zip(bandit.posterior(0), posterior))


def test_an_arm_with_a_wide_prior_keeps_learning_one_context():
    """With a prior variance as large as /arms allows and a small noise variance, round-off left the
    Gram matrix of one context played ~1,000 times an eigenvalue of -1e-10, the Cholesky factor of
    the precision failed, and every later update of the arm was refused as non-finite."""
    bandit = LinTS(12, (), LinTSConfig(noise_var=1e-4))
    bandit.add_arm("wide", None, 1e6)
    x = np.abs(np.random.default_rng(0).normal(size=12)) * 2
    for _ in range(2000):
        bandit.update("wide", x, 0.3)
    assert bandit.arms[0].plays == 2000
    assert bandit.mean_scores(x[None])[0, 0] == pytest.approx(0.3, abs=0.02)
    mean, cov = bandit.posterior(0)
    assert np.all(np.isfinite(mean)) and np.all(np.linalg.eigvalsh(cov) > 0)


# ----- encoder and feature table
def test_identity_encoder_standardises_and_round_trips():
    x = np.c_[np.arange(10.0), np.full(10, 3.0)]
    enc = IdentityEncoder.fit(["s_a", "f_b"], x)
    z = enc.encode(x)
    np.testing.assert_allclose(z[:, 0].mean(), 0, atol=1e-12)
    np.testing.assert_allclose(z[:, 0].std(), 1)
    np.testing.assert_array_equal(z[:, 1], 0)  # constant column
    again = load_encoder(json.loads(json.dumps(enc.spec())))
    np.testing.assert_array_equal(again.encode(x), z)
    with pytest.raises(FeatureError, match="expected width 2"):
        enc.encode(np.zeros(3))
    with pytest.raises(FeatureError, match=r"^features\[1\]: must be a finite number"):
        enc.encode([1.0, float("inf")])


def test_undefined_features_are_left_out_of_the_statistics_and_imputed_with_the_mean():
    """A column undefined in some rows (measured on the auxiliary's task, where some auxiliaries
    have none) keeps its information elsewhere: statistics skip the gaps, a gap encodes as the mean."""
    x = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 4.0], [7.0, np.nan]])
    enc = IdentityEncoder.fit(["s_a", "f_b_on_b_task"], x)
    np.testing.assert_allclose(enc.mean, [4.0, 3.0])
    np.testing.assert_allclose(enc.scale, [np.sqrt(5.0), 1.0])
    z = enc.encode(x)
    np.testing.assert_allclose(z[:, 1], [-1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(enc.encode([[3.0, None]]), enc.encode([[3.0, 3.0]]))
    with pytest.raises(ConfigError, match=r"columns defined in no row: \['f_b_on_b_task'\]"):
        IdentityEncoder.fit(["s_a", "f_b_on_b_task"], np.c_[x[:, 0], np.full(4, np.nan)])


def test_feature_table_lookup_names_what_is_unknown():
    _, features = synthetic_tables(SyntheticBanditSpec(n_models=3, tasks=("code",), n_features=2))
    table = FeatureTable(features, ["s_syn0", "f_syn1"])
    row = features.filter((pl.col("a") == "m0") & (pl.col("b") == "m2"))
    np.testing.assert_array_equal(table.lookup("m0", "m2", "code"), row.select("s_syn0", "f_syn1").to_numpy()[0])
    with pytest.raises(UnknownNameError, match="model 'gpt'"):
        table.lookup("gpt", "m2", "code")
    with pytest.raises(UnknownNameError, match="task 'law'"):
        table.lookup("m0", "m2", "law")
    with pytest.raises(UnknownNameError, match="no features for pair"):
        table.lookup("m0", "m0", "code")


# ----- decision ledger and state folder
@pytest.fixture()
def core(tmp_path: Path) -> BanditCore:
    z, r, _ = _linear_data(60, 3, 3, 0.1)
    enc = IdentityEncoder.fit(["s_0", "s_1", "f_2"], z)
    bandit = LinTS(3, ["linear", "slerp", "ties"], LinTSConfig(seed=1))
    bandit.warm_start(enc.encode(z), r)
    return BanditCore.create(tmp_path / "state", enc, bandit, max_pending=5)


def test_decide_feedback_and_idempotency(core: BanditCore):
    d = core.decide([0.1, 0.2, 0.3])
    assert d["operator"] in ("linear", "slerp", "ties")
    assert d["operator"] == max(d["scores"], key=d["scores"].get)
    first = core.feedback(d["decision_id"], 0.7)
    again = core.feedback(d["decision_id"], 0.1)
    assert (first["status"], again["status"], again["reward"]) == ("counted", "duplicate", 0.7)
    stats = core.stats()
    assert (stats["feedback"], stats["duplicates"], stats["pending"]) == (1, 1, 0)
    arm = next(a for a in stats["arms"] if a["name"] == d["operator"])
    assert (arm["plays"], arm["mean_reward"]) == (1, 0.7)
    with pytest.raises(UnknownDecisionError, match="'nope'"):
        core.feedback("nope", 0.5)
    d2 = core.decide([0.0, 0.0, 0.0])
    with pytest.raises(RewardError):
        core.feedback(d2["decision_id"], float("nan"))
    with pytest.raises(FeatureError, match="width 3"):
        core.decide([1.0, 2.0])


def test_decide_can_be_restricted_to_some_arms(core: BanditCore, tmp_path: Path):
    shutil.copytree(core.state_dir, tmp_path / "twin")
    twin = BanditCore(tmp_path / "twin")
    free, only = twin.decide([0.4, 0.1, -0.3]), core.decide([0.4, 0.1, -0.3], arms=["slerp"])
    assert only["operator"] == "slerp"
    assert only["scores"] == free["scores"]  # same draws: the restriction only limits the argmax
    with pytest.raises(UnknownNameError, match="unknown arm 'magic'"):
        core.decide([0.0, 0.0, 0.0], arms=["slerp", "magic"])
    with pytest.raises(BanditError, match="at least one arm"):
        core.decide([0.0, 0.0, 0.0], arms=[])


def test_state_folder_survives_a_restart_exactly(core: BanditCore, tmp_path: Path):
    pending = core.decide([0.3, -0.2, 1.0])
    done = core.decide([1.0, 0.0, 0.0])
    core.feedback(done["decision_id"], 0.4)
    shutil.copytree(core.state_dir, tmp_path / "twin")
    restarted = BanditCore(tmp_path / "twin")  # what a restarted actor does (on a copy: see below)
    assert restarted.stats() == core.stats()
    ctx = [0.5, 0.5, -0.5]
    assert restarted.decide(ctx)["scores"] == core.decide(ctx)["scores"]
    restarted = BanditCore(core.state_dir)
    assert restarted.feedback(pending["decision_id"], 0.9)["status"] == "counted"
    assert restarted.feedback(done["decision_id"], 0.4)["status"] == "duplicate"
    # A stray temporary file from an interrupted write does not matter; a corrupt state does.
    (core.state_dir / f".{STATE_FILE}.dead.tmp").write_bytes(b"partial")
    assert BanditCore(core.state_dir).stats()["feedback"] == 2
    broken = tmp_path / "broken"
    shutil.copytree(core.state_dir, broken)
    (broken / STATE_FILE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=STATE_FILE):
        BanditCore(broken)


def test_two_services_over_one_folder_see_each_others_saves(core: BanditCore):
    """Two services over one state folder (two `serve`s, or a RayService's old and new cluster
    during an upgrade; here two objects used in turn) used to overwrite each other's saves: each
    request now runs on the newest saved state, and a save never replaces one it has not seen."""
    other = BanditCore(core.state_dir)
    mine = core.decide([0.1, 0.2, 0.3])
    theirs = other.decide([0.3, 0.2, 0.1])  # made on a state that holds `mine`
    assert core.feedback(theirs["decision_id"], 0.5)["status"] == "counted"
    assert other.feedback(mine["decision_id"], 0.25)["status"] == "counted"
    other.add_arm("dare_ties")
    assert core.decide([0.0, 0.0, 0.0], arms=["dare_ties"])["operator"] == "dare_ties"
    final = BanditCore(core.state_dir).stats()
    assert (final["decisions"], final["feedback"], final["pending"]) == (3, 2, 1)
    assert final == core.stats() == other.stats()
    # The last guard: a save that finds the file replaced since this process read it (possible
    # only where the volume ignores the lock; here the lock is bypassed) writes nothing.
    stale = BanditCore(core.state_dir)
    core.decide([0.2, 0.2, 0.2])
    before = (core.state_dir / STATE_FILE).read_bytes()
    stale.counters["decisions"] = 99
    with pytest.raises(CheckpointError, match="this volume does not honour POSIX locks"):
        stale._persist()
    assert (core.state_dir / STATE_FILE).read_bytes() == before
    assert stale.decide([0.2, 0.2, 0.2])["seq"] == 4  # reloaded first: the 99 is gone
    assert BanditCore(core.state_dir).stats()["decisions"] == 5


_WRITER = """
import sys, time
from pathlib import Path
from simmerge_ray.bandit.core import BanditCore

core = BanditCore(sys.argv[1])
(Path(sys.argv[3]) / f"ready-{sys.argv[4]}").touch()
while not (Path(sys.argv[3]) / "go").exists():  # all start together, so their loops overlap
    time.sleep(0.005)
for i in range(int(sys.argv[2])):
    d = core.decide([0.1 * (i % 7), 0.2, -0.3])
    assert core.feedback(d["decision_id"], 0.5)["status"] == "counted"
"""


def _start_together(sync: Path, procs: list) -> None:
    """Release processes that wait for sync/go once each has written its sync/ready-k."""
    import time

    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.01)
    (sync / "go").touch()


def test_processes_writing_one_folder_at_once_lose_nothing(core: BanditCore):
    """Three processes deciding and rewarding over one state folder at the same time: every
    decision and every reward is in the final state (without the lock and the check of the file
    a process read, their saves overwrote each other and feedback met unknown ids)."""
    import subprocess
    import sys

    sync = core.state_dir.parent / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(core.state_dir), "30", str(sync), str(k)],
                              stderr=subprocess.PIPE) for k in range(3)]
    _start_together(sync, procs)
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    final = BanditCore(core.state_dir).stats()
    assert (final["decisions"], final["feedback"], final["pending"]) == (90, 90, 0)
    assert sum(a["plays"] for a in final["arms"]) == 90


def test_two_cores_in_one_process_take_turns(core: BanditCore):
    """A POSIX lock belongs to the process, so two cores over one folder in two threads of one
    process (a library user's, not the actor's) both held it at once and saved over each other;
    the lock now also excludes threads."""
    import threading

    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def loop() -> None:
        mine = BanditCore(core.state_dir)
        go.wait()
        try:
            for i in range(40):
                d = mine.decide([0.1 * (i % 7), 0.2, -0.3])
                assert mine.feedback(d["decision_id"], 0.5)["status"] == "counted"
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    final = BanditCore(core.state_dir).stats()
    assert (final["decisions"], final["feedback"], final["pending"]) == (80, 80, 0)


def test_a_batch_answers_as_its_calls_one_by_one_and_saves_once(core: BanditCore, tmp_path: Path):
    """Group commit: a batch's calls are answered as the same calls one at a time would be, its
    refused calls leave no trace (not even a draw of the generator), and it is saved once."""
    shutil.copytree(core.state_dir, tmp_path / "twin")
    twin = BanditCore(tmp_path / "twin")
    answers = core.run([
        Call("decide", ([0.3, -0.2, 1.0], None)),
        Call("decide", ([float("nan")] * 3, None)),  # refused: every value missing
        Call("feedback", ("no-such-id", 0.5)),  # refused: unknown id
        Call("add_arm", ("linear",)),  # refused: the arm exists
        Call("add_arm", ("dare_ties",)),
        Call("decide", ([0.5, 0.5, -0.5], ["dare_ties", "ties"])),
        Call("stats"),
    ])
    assert core.saves == 1
    assert [type(a).__name__ for a in answers] == ["dict", "FeatureError", "UnknownDecisionError",
                                                   "DuplicateArmError", "dict", "dict", "dict"]
    first = twin.decide([0.3, -0.2, 1.0])
    twin.add_arm("dare_ties")
    last = twin.decide([0.5, 0.5, -0.5], arms=["dare_ties", "ties"])
    assert (answers[0]["scores"], answers[5]["scores"]) == (first["scores"], last["scores"])
    assert answers[6]["decisions"] == 2 and answers[6]["pending"] == 2
    assert BanditCore(core.state_dir).stats() == twin.stats() == core.stats()
    # Feedback in a batch: the second reward of one id is a duplicate, as it would be one by one.
    ids = [answers[0]["decision_id"], answers[5]["decision_id"]]
    fb = core.run([Call("feedback", (ids[0], 0.25)), Call("feedback", (ids[1], 0.5)), Call("feedback", (ids[0], 0.75))])
    assert [a["status"] for a in fb] == ["counted", "counted", "duplicate"] and core.saves == 2
    saved = BanditCore(core.state_dir).stats()
    assert (saved["feedback"], saved["duplicates"], saved["pending"]) == (2, 1, 0)


def test_a_batch_that_cannot_be_saved_is_answered_again_one_save_each(core: BanditCore):
    """A batch whose state is refused at the save (here an arm's statistics made non-finite in
    memory behind the core's back) is not lost as a whole: the saved state is reloaded and each
    call is answered again with its own save."""
    core.bandit.arms[0].rr = float("nan")
    answers = core.run([Call("decide", ([0.1, 0.2, 0.3], None)), Call("add_arm", ("dare_ties",))])
    assert all(isinstance(a, dict) for a in answers), answers
    assert core.saves == 2 and np.isfinite(core.bandit.arms[0].rr)
    saved = BanditCore(core.state_dir).stats()
    assert saved["decisions"] == 1 and "dare_ties" in [a["name"] for a in saved["arms"]]


def test_the_actor_answers_calls_that_arrive_together_with_one_save(core: BanditCore, tmp_path: Path):
    """Plain class, no Ray (Ray runs an async actor's methods on one event loop, as here): calls
    queued while no batch is under way become one batch, each answered only after its save. A
    batch holds at most `max_pending` calls, so its decisions never expire each other before
    they are answered."""
    import asyncio

    from simmerge_ray.bandit.actor import BanditActor

    def together(actor: BanditActor, n: int) -> list:
        async def calls() -> list:
            sent = [actor.decide([0.1 * i, 0.2, -0.3]) for i in range(n)] + [actor.feedback("no-such-id", 0.5)]
            return await asyncio.gather(*sent, return_exceptions=True)
        return asyncio.run(calls())

    roomy = BanditCore.create(tmp_path / "roomy", core.encoder, core.bandit)  # max_pending 1000
    actor = BanditActor(str(roomy.state_dir))
    answers = together(actor, 20)
    assert sorted(a["seq"] for a in answers[:20]) == list(range(20)) and isinstance(answers[20], UnknownDecisionError)
    assert actor._core is not None and actor._core.saves == 1
    assert BanditCore(roomy.state_dir).stats()["pending"] == 20
    # The fixture keeps 5 pending: 21 calls go in batches of 5, and each batch's ids are pending
    # when they are answered (one batch of 20 handed out 15 ids it had expired itself).
    small = BanditActor(str(core.state_dir))
    answers = together(small, 20)
    assert small._core is not None and small._core.saves == 4
    last = [a["decision_id"] for a in answers[15:20]]
    assert [small._core.feedback(d, 0.5)["status"] for d in last] == ["counted"] * 5
    with pytest.raises(ValueError, match=r"more decisions than max_pending \(5\)"):
        core.run([Call("decide", ([0.1, 0.2, 0.3], None))] * 6)


def test_an_interrupt_raised_by_one_call_fails_that_call_only(core: BanditCore):
    """A value whose conversion raises KeyboardInterrupt (only a Python caller of the actor can
    send one) used to escape the batch and the actor's event loop: its batch and every later
    call hung. It is now that call's error; the rest of the batch is answered and saved."""
    import asyncio

    from simmerge_ray.bandit.actor import BanditActor

    class Interrupting:
        def __float__(self) -> float:
            raise KeyboardInterrupt("from a feature value")

    actor = BanditActor(str(core.state_dir))

    async def calls() -> list:
        sent = [actor.decide([0.1, 0.2, 0.3]), actor.decide([Interrupting(), 0.2, 0.3]), actor.decide([0.3, 0.2, 0.1])]
        return await asyncio.gather(*sent, return_exceptions=True)

    first, bad, last = asyncio.run(calls())
    assert isinstance(bad, RuntimeError) and "KeyboardInterrupt raised by the call: from a feature value" in str(bad)
    assert (first["seq"], last["seq"]) == (0, 1)
    assert asyncio.run(actor.stats())["decisions"] == 2 == BanditCore(core.state_dir).stats()["decisions"]
    with pytest.raises(KeyboardInterrupt):  # in process, the caller's own interrupt stays one
        core.decide([Interrupting(), 0.2, 0.3])
    assert core.decide([0.1, 0.2, 0.3])["seq"] == 2


def test_a_batch_is_never_applied_twice_nor_lost_to_a_file_it_could_not_reopen(core: BanditCore):
    """Faults injected around a save: an interrupt raised after the batch is written is raised
    (replaying the batch applied it twice); a save whose file could not be reopened makes the
    next call of a replay reload (it was refused as "this volume does not honour POSIX locks")."""

    class InterruptedAfterSaving(BanditCore):
        def _persist(self) -> None:
            super()._persist()
            raise KeyboardInterrupt("after the write")

    interrupted = InterruptedAfterSaving(core.state_dir)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run([Call("decide", ([0.1, 0.2, 0.3], None)), Call("decide", ([0.3, 0.2, 0.1], None))])
    assert BanditCore(core.state_dir).stats()["decisions"] == 2

    class NotReopened(BanditCore):
        def _persist(self) -> None:
            super()._persist()
            self._seen = None

    lost = NotReopened(core.state_dir)
    lost.bandit.arms[0].rr = float("nan")  # the batch's save is refused: answered again one by one
    answers = lost.run([Call("decide", ([0.1, 0.2, 0.3], None)), Call("add_arm", ("dare_ties",))])
    assert all(isinstance(a, dict) for a in answers), answers
    assert BanditCore(core.state_dir).stats()["decisions"] == 3


def test_a_call_cancelled_before_its_batch_is_not_applied(core: BanditCore):
    import asyncio

    from simmerge_ray.bandit.actor import BanditActor

    actor = BanditActor(str(core.state_dir))

    async def calls() -> list:
        tasks = [asyncio.ensure_future(actor.decide([0.1 * i, 0.2, 0.3])) for i in range(3)]
        await asyncio.sleep(0)  # all three queued, no batch begun
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, cancelled, last = asyncio.run(calls())
    assert isinstance(cancelled, asyncio.CancelledError) and (first["seq"], last["seq"]) == (0, 1)
    assert BanditCore(core.state_dir).stats()["decisions"] == 2


def test_a_state_that_does_not_load_gives_each_caller_its_own_error(core: BanditCore):
    """Every call of a batch whose state does not load is told why, each with its own exception
    object: one shared object collected every caller's traceback (1 MB of error text for 256)."""
    import asyncio

    from simmerge_ray.bandit.actor import BanditActor

    actor = BanditActor(str(core.state_dir))
    (core.state_dir / STATE_FILE).write_bytes(b"not a zip")

    async def calls() -> list:
        return await asyncio.gather(*[actor.stats() for _ in range(4)], return_exceptions=True)

    errors = asyncio.run(calls())
    assert all(isinstance(e, CheckpointError) and "unreadable bandit state" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 4


def test_decide_and_feedback_refuse_what_a_python_caller_gets_wrong(core: BanditCore):
    """Through the actor a caller passes Python values the HTTP models would have refused."""
    with pytest.raises(FeatureError, match="^features: one context per decision, got 2 rows"):
        core.decide([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    with pytest.raises(BanditError, match="^'arms' must be a list of arm names, got the string 'linear'"):
        core.decide([0.1, 0.2, 0.3], arms="linear")
    with pytest.raises(BanditError, match="^prior_var: must be a number, got True"):
        core.add_arm("dare_ties", prior_var=True)
    d = core.decide([0.1, 0.2, 0.3])
    assert core.feedback(d["decision_id"], np.float32(0.5))["status"] == "counted"  # a numpy number is a number
    assert core.stats()["decisions"] == 1 and "dare_ties" not in [a["name"] for a in core.stats()["arms"]]


def test_a_state_that_fails_to_reload_is_never_served_nor_saved_over(core: BanditCore, tmp_path: Path):
    """A reload that fails (a damaged file from another writer, a folder re-created or removed)
    used to leave the process believing it had the newest state: it then served the old one and
    saved over the file it never read."""
    core.decide([0.1, 0.2, 0.3])
    good = (core.state_dir / STATE_FILE).read_bytes()
    _damage_state(core.state_dir, lambda m, a: m.pop("counters"))  # as another process would
    for _ in range(2):  # every request tries again, none serves the old state
        with pytest.raises(CheckpointError, match="missing field 'counters'"):
            core.stats()
    with pytest.raises(CheckpointError, match="missing field 'counters'"):
        core.decide([0.1, 0.2, 0.3])
    (core.state_dir / STATE_FILE).write_bytes(good)  # repaired: served again, nothing lost
    assert core.stats()["decisions"] == 1 and core.decide([0.1, 0.2, 0.3])["seq"] == 1
    BanditCore.create(core.state_dir, core.encoder, core.bandit, max_done=7, overwrite=True)  # bandit-init again
    with pytest.raises(CheckpointError, match="created anew since this process loaded it"):
        core.decide([0.1, 0.2, 0.3])
    shutil.move(core.state_dir, tmp_path / "moved")
    with pytest.raises(CheckpointError, match="the bandit state folder is gone"):
        core.stats()


def test_ledger_is_bounded_and_arms_persist(core: BanditCore):
    ids = [core.decide([0.0, 0.1, 0.2])["decision_id"] for _ in range(7)]
    with pytest.raises(UnknownDecisionError):
        core.feedback(ids[0], 0.5)  # expired: max_pending is 5
    assert core.feedback(ids[-1], 0.5)["status"] == "counted"
    core.add_arm("dare_ties", prior="zero", prior_var=0.5)
    meta, _ = read_state(core.state_dir)
    assert [a["name"] for a in meta["lints"]["arms"]][-1] == "dare_ties"
    assert set(BanditCore(core.state_dir).decide([0.0, 0.0, 0.0])["scores"]) == {
        "linear", "slerp", "ties", "dare_ties"
    }
    assert core.stats()["expired"] == 2
    with pytest.raises(CheckpointError, match="already exists"):
        BanditCore.create(core.state_dir, core.encoder, core.bandit)


def test_anonymous_decisions_cannot_expire_trusted_ones(core: BanditCore):
    """An open /decide used to let anyone push the service's own pending decisions out of the
    ledger; decisions asked for with the token now have a budget of their own, kept on disk."""
    kept = [core.decide([0.0, 0.1, 0.2], trusted=True)["decision_id"] for _ in range(3)]
    flood = [core.decide([0.0, 0.1, 0.2])["decision_id"] for _ in range(12)]
    assert core.stats()["pending"] == 8 and core.stats()["pending_trusted"] == 3 and core.stats()["expired"] == 7
    restarted = BanditCore(core.state_dir)
    assert all(restarted.feedback(d, 0.5)["status"] == "counted" for d in kept)
    with pytest.raises(UnknownDecisionError):
        restarted.feedback(flood[6], 0.5)  # the anonymous budget (5) keeps the newest anonymous five
    assert restarted.feedback(flood[7], 0.5)["status"] == "counted"
    more = [restarted.decide([0.0, 0.1, 0.2], trusted=True)["decision_id"] for _ in range(6)]
    with pytest.raises(UnknownDecisionError):
        restarted.feedback(more[0], 0.5)  # trusted decisions expire too, among themselves
    assert restarted.stats()["pending"] == 4 + 5


# ----- replay simulator
def test_replay_data_joins_and_averages_labels():
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=3, tasks=("code",), n_features=2))
    dup = labels.head(1).with_columns(pl.col("utility") + 1.0)  # a second params setting
    data = replay_data(pl.concat([labels, dup]), features)
    assert data.operators == ("dare_ties", "linear", "slerp", "ties")
    assert data.rewards.shape == (6, 4)
    first = labels.row(0, named=True)
    row = data.keys.index((first["task"], first["expert"], first["aux"]))
    assert data.rewards[row, data.operators.index(first["operator"])] == pytest.approx(first["utility"] + 0.5)
    with pytest.raises(ConfigError, match=r"no row for 1 labelled .*\('code', 'm1', 'm0'\)"):
        replay_data(labels, features.filter((pl.col("a") != "m1") | (pl.col("b") != "m0")))
    train, test = split_by_pair(data, 0.34, seed=0)
    pair = lambda k: frozenset(k[1:])  # noqa: E731
    assert not {pair(k) for k in train.keys} & {pair(k) for k in test.keys}


def test_bandit_beats_uniform_and_learns_an_added_operator():
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=8, seed=2))
    train, test = split_by_pair(replay_data(labels, features), 0.3, seed=0)
    settings = SimSettings(rounds=150, repeats=3, seed=0, checkpoints=(60,))
    res = simulate(train, test, settings)["policies"]
    regret = {name: res[name]["at"]["150"]["mean"] for name in res}
    assert regret["bandit"] < 0.25 * regret["uniform"]
    assert regret["bandit_cold"] < regret["uniform"]
    assert regret["bandit"] <= regret["bandit_cold"]
    assert res["bandit"]["oracle_pick_rate"] > 0.8 > 0.4 > res["uniform"]["oracle_pick_rate"]
    # Hide the operator that is most often best for 20 rounds, then add it.
    best = int(np.bincount(np.argmax(train.rewards, axis=1)).argmax())
    best_share = float((np.argmax(test.rewards, axis=1) == best).mean())
    added = simulate(train, test, settings, new_operator=train.operators[best], add_at=20)["policies"]
    assert added["greedy_offline"]["new_operator_share_after_add"] == 0.0
    assert added["bandit"]["new_operator_share_after_add"] > 0.5 * best_share
    assert added["bandit"]["at"]["150"]["mean"] < 0.5 * added["greedy_offline"]["at"]["150"]["mean"]


def test_cli_bandit_init_and_sim(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=5, seed=2))
    labels.write_parquet(tmp_path / "labels.parquet")
    features.write_parquet(tmp_path / "features.parquet")
    state = tmp_path / "state"
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "features.parquet"),
                     "--labels", str(tmp_path / "labels.parquet")]) == 0
    core = BanditCore(state)
    assert core.bandit.arm_names == ["dare_ties", "linear", "slerp", "ties"]
    assert all(a.weight == 60 for a in core.bandit.arms)  # 5*4 ordered pairs x 3 tasks
    assert cli_main(["bandit-init", "--out", str(tmp_path / "state2"), "--features",  # --out: as other commands
                     str(tmp_path / "features.parquet"), "--labels", str(tmp_path / "labels.parquet")]) == 0
    assert BanditCore(tmp_path / "state2").bandit.arm_names == core.bandit.arm_names
    # The bandit served is the one the replay simulator measures: warm_bandit, variances by evidence.
    data = replay_data(labels, features)
    want = warm_bandit(core.encoder, data.operators, core.encoder.encode(data.x), data.rewards, SimSettings())
    assert core.bandit.noise_var == want.noise_var
    assert [a.prior_var for a in core.bandit.arms] == [a.prior_var for a in want.arms]
    capsys.readouterr()
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "features.parquet"),
                     "--labels", str(tmp_path / "labels.parquet"), "--noise-var", "0.5", "--overwrite"]) == 0
    assert capsys.readouterr().err.splitlines() == [  # it used to say nothing
        "simmerge bandit-init: warning: --noise-var not used: a warm start chooses both variances by evidence on the labels"]
    assert BanditCore(state).bandit.noise_var == want.noise_var
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "features.parquet"),
                     "--labels", str(tmp_path / "labels.parquet"), "--prior-var", "2.5", "--overwrite"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "simmerge bandit-init: warning: --prior-var not used: a warm start chooses both variances by evidence on the "
        "labels (--prior-var stays the prior variance of an arm added later)"]
    core = BanditCore(state)
    assert [a.prior_var for a in core.bandit.arms] == [a.prior_var for a in want.arms]
    core.bandit.add_arm("task_arithmetic")
    assert core.bandit.arms[-1].prior_var == 2.5  # what the warning says
    out = tmp_path / "sim"
    assert cli_main(["bandit-sim", "--labels", str(tmp_path / "labels.parquet"), "--features",
                     str(tmp_path / "features.parquet"), "--out", str(out), "--rounds", "30",
                     "--repeats", "2", "--add-at", "10"]) == 0
    report = json.loads((out / "regret.json").read_text())
    assert set(report) == {"all_operators", "operator_added"}
    train, _ = split_by_pair(data, 0.3, seed=0)  # bandit-sim's defaults
    assert report["operator_added"]["new_operator"] == most_often_best(train)
    assert len(report["all_operators"]["policies"]["bandit"]["cum_regret_mean"]) == 30
    assert (out / "regret.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["bandit-init", "--state", str(state), "--features",
                     str(tmp_path / "features.parquet"), "--operators", "a,b"]) == 2  # exists
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "features.parquet"),
                     "--operators", "a,b", "--overwrite"]) == 0
    assert BanditCore(state).bandit.arm_names == ["a", "b"]
    capsys.readouterr()
    # The features folder works as well as its table; a name that is no arm of the registry (a
    # typo?) is served with a warning naming the nearest arm; a repeated one is refused.
    (tmp_path / "feats").mkdir()
    (tmp_path / "features.parquet").rename(tmp_path / "feats" / "features.parquet")
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "feats"),
                     "--operators", "linear,tiess", "--overwrite"]) == 0
    assert BanditCore(state).bandit.arm_names == ["linear", "tiess"]
    assert capsys.readouterr().err.splitlines() == [
        "simmerge bandit-init: warning: --operators: 'tiess' is not one of simmerge's arms (did you mean 'ties'?); "
        "it is served as its own arm"]
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "feats"),
                     "--operators", "linear,ties,linear", "--overwrite"]) == 2
    assert "--operators: 'linear' is listed twice" in capsys.readouterr().err
    # A list of no names said "give labels (warm start) or operators (cold start)", naming no flag;
    # an existing state without --overwrite said "(pass overwrite)", after the warm start's work.
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "feats"),
                     "--operators", ",", "--overwrite"]) == 2
    assert capsys.readouterr().err == ("simmerge bandit-init: error: --operators ',': no arm names (give them "
                                       "comma-separated: linear,ties)\n")
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tmp_path / "feats"),
                     "--operators", "linear"]) == 2
    assert capsys.readouterr().err == (f"simmerge bandit-init: error: {state}: a bandit state already exists (pass "
                                       f"--overwrite to replace it)\n")
    assert BanditCore(state).bandit.arm_names == ["linear", "tiess"]
    (tmp_path / "feats" / "features.parquet").rename(tmp_path / "features.parquet")
    # A folder of the user's (even one with a state.npz) is never written into, nor one holding
    # the feature table.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "state.npz").write_bytes(b"the user's")
    for folder, flags in ((mine, []), (mine, ["--overwrite"]), (tmp_path, ["--overwrite"])):
        assert cli_main(["bandit-init", "--state", str(folder), "--features", str(tmp_path / "features.parquet"),
                         "--operators", "a,b", *flags]) == 2
    assert (mine / "state.npz").read_bytes() == b"the user's" and sorted(p.name for p in mine.iterdir()) == ["state.npz"]


def test_cli_bandit_init_over_the_selectors_encoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """--selector: the served bandit is the pipeline replay's (the selector's hidden layer as
    context, its head as each arm's prior mean), and a selector refitted in place is refused."""
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.encoder import SelectorEncoder
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.train import fit_selector
    from simmerge_ray.selector.uncertainty import add_uncertainty

    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=5, seed=2))
    labels.write_parquet(tmp_path / "labels.parquet")
    features.write_parquet(tmp_path / "features.parquet")
    pairs = load_pair_data(tmp_path / "features.parquet", tmp_path / "labels.parquet")
    sel = fit_selector(pairs, SelectorConfig(epochs=30, hidden=16, task_encoding=False))
    add_uncertainty(sel, pairs, fit=None, folds=0)  # as `simmerge fit` does: the training rows' domain
    sel.save(tmp_path / "sel")
    state, args = tmp_path / "state", ["--features", str(tmp_path / "features.parquet"), "--selector",
                                       str(tmp_path / "sel")]
    assert cli_main(["bandit-init", "--state", str(state), "--labels", str(tmp_path / "labels.parquet"), *args]) == 0
    assert "the encoder of" in capsys.readouterr().out
    core, enc = BanditCore(state), SelectorEncoder.load(tmp_path / "sel")
    assert core.settings["encoder"]["kind"] == "selector" and core.encoder.width == enc.width == 16
    data = replay_data(labels, features, enc.feature_names)
    want = warm_bandit(enc, data.operators, enc.encode(data.x), data.rewards, SimSettings())
    assert core.bandit.noise_var == want.noise_var
    np.testing.assert_array_equal(core.bandit.mean_scores(enc.encode(data.x[:5])), want.mean_scores(enc.encode(data.x[:5])))
    # Contexts are judged against the selector's own training rows (its recorded domain).
    assert core.decide(data.x[0])["out_of_range"] is None
    far = data.x[0] + 0.0
    far[2] = enc.selector.mean[2] + 60 * enc.selector.scale[2]
    assert core.decide(far)["out_of_range"]["feature"] == enc.feature_names[2]
    # A cold start begins at the selector's own predictions for its arms, at zero for a new one.
    assert cli_main(["bandit-init", "--state", str(state), "--operators", "linear,lerp", "--overwrite", *args]) == 0
    cold, head = BanditCore(state).bandit, enc.head_prior()
    np.testing.assert_array_equal(cold.arms[0].prior_mean, head["linear"])
    assert not cold.arms[1].prior_mean.any()
    # The selector folder is an input: never written into; refitting it in place orphans the state.
    assert cli_main(["bandit-init", "--state", str(tmp_path / "sel"), "--operators", "linear", "--overwrite",
                     *args]) == 2
    capsys.readouterr()
    schema = tmp_path / "sel" / "selector.json"
    schema.write_text(schema.read_text() + "\n")
    with pytest.raises(CheckpointError, match="this selector changed since the bandit state was created over it"):
        BanditCore(state)
    # A task-encoded selector's hidden layer expects a task one-hot the bandit never gives: said.
    fit_selector(pairs, SelectorConfig(epochs=30, hidden=16)).save(tmp_path / "sel_tasks")
    assert cli_main(["bandit-init", "--state", str(tmp_path / "state_tasks"), "--features",
                     str(tmp_path / "features.parquet"), "--selector", str(tmp_path / "sel_tasks"),
                     "--operators", "linear"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"simmerge bandit-init: warning: {tmp_path / 'sel_tasks'} was fitted with task encoding, and the bandit's "
        "encoder has no task code: its hidden layer and prior head see every task's one-hot as zero (a selector fitted with "
        "--no-task-encoding encodes as it was trained)"]
    # A selector fitted on another quantity than the reward (the auxiliaries' side) was taken
    # without a word, its head the arms' prior means of the wrong quantity.
    from input_checks import as_aux_selector  # beside this file

    aux = as_aux_selector(tmp_path / "sel", tmp_path / "sel_aux")
    assert cli_main(["bandit-init", "--state", str(tmp_path / "state_aux"), "--features",
                     str(tmp_path / "features.parquet"), "--selector", str(aux), "--operators", "linear"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"simmerge bandit-init: error: {aux}: --selector was fitted with --target aux_gap_closed, and its head is each "
        "arm's prior mean of the bandit's reward, the two-sided utility: give a selector fitted on utility "
        "(`simmerge fit --target utility`, the default)"]
    assert not (tmp_path / "state_aux").exists()


def test_cli_bandit_init_names_a_feature_table_without_finite_columns(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    _, features = synthetic_tables(SyntheticBanditSpec(n_models=3, seed=1))
    path = tmp_path / "features.parquet"
    features.with_columns(pl.lit(float("nan")).alias(c) for c in features.columns
                          if c.startswith(("s_", "f_"))).write_parquet(path)
    state = tmp_path / "state"
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(path), "--operators", "linear,ties"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"simmerge bandit-init: error: {path}: no numeric column prefixed s_ or f_ that is defined in "
                   "some row"], err
    assert not state.exists()  # nothing written


def test_a_pair_whose_auxiliary_has_no_task_is_served_with_its_features_imputed(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]):
    """A catalog model without a task has no probes of its own: the columns measured on b's task
    are null in its rows. bandit-init keeps those columns (it dropped them all before), and a
    decision for such a pair encodes the gap as the offline mean instead of being refused."""
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=4, seed=3))
    taskless = pl.col("b") == "m3"
    features = features.with_columns(
        pl.when(taskless).then(None).otherwise(pl.col("f_syn7")).alias("f_syn7_on_b_task"),
        pl.lit(float("nan")).alias("s_broken"))
    path = tmp_path / "features.parquet"
    features.write_parquet(path)
    labels.write_parquet(tmp_path / "labels.parquet")
    state = tmp_path / "state"
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(path),
                     "--labels", str(tmp_path / "labels.parquet")]) == 0
    out = capsys.readouterr().out
    assert "1 feature column(s) left out (defined in no row): s_broken" in out
    core = BanditCore(state)
    names = core.encoder.feature_names
    assert "f_syn7_on_b_task" in names and "s_broken" not in names
    col = names.index("f_syn7_on_b_task")
    defined = features.filter(~taskless)["f_syn7_on_b_task"].to_numpy()
    assert core.encoder.mean[col] == pytest.approx(defined.mean())
    x = FeatureTable(features, names).lookup("m0", "m3", "code")
    assert np.isnan(x[col]) and np.isfinite(np.delete(x, col)).all()
    z = core.encoder.encode(x)
    assert z[0, col] == 0.0 and np.isfinite(z).all()
    filled = x.copy()
    filled[col] = core.encoder.mean[col]
    assert core.decide(x)["expected"] == pytest.approx(core.decide(filled)["expected"], rel=1e-12)
    assert core.decide(x)["expected"] != pytest.approx(core.decide(np.nan_to_num(x))["expected"], rel=1e-6)
    # bandit-sim replays the same columns (it refused the whole table before).
    assert cli_main(["bandit-sim", "--labels", str(tmp_path / "labels.parquet"), "--features", str(path),
                     "--out", str(tmp_path / "sim"), "--rounds", "10", "--repeats", "1", "--add-at", "3"]) == 0
    assert "bandit-sim: 1 feature column(s) left out (defined in no row): s_broken" in capsys.readouterr().out
    # An infinite feature is a fault of the table, refused by name (it used to be dropped quietly).
    features.with_columns(s_broken=pl.lit(float("inf"))).write_parquet(path)
    assert cli_main(["bandit-init", "--state", str(tmp_path / "s2"), "--features", str(path),
                     "--labels", str(tmp_path / "labels.parquet")]) == 2
    assert f"{path}: column 's_broken' is inf in 36 row(s)" in capsys.readouterr().err
    # A column nothing reads is not checked: a state over the other columns is still served.
    assert FeatureTable.load(path, names).lookup("m0", "m3", "code").shape == (len(names),)
    with pytest.raises(ConfigError, match="column 's_broken' is inf"):
        FeatureTable.load(path, [*names, "s_broken"])


def test_cli_serve_refuses_a_folder_without_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli_main(["serve", "--state", str(tmp_path / "none"), "--port", "1"]) == 2
    assert "no bandit state here" in capsys.readouterr().err


# ----- hostile values: declared bounds, nothing non-finite learned or saved (issue 21)
def test_rewards_and_features_outside_the_declared_bounds_are_refused(core: BanditCore):
    d = core.decide([0.1, 0.2, 0.3])
    state = core.state_dir / STATE_FILE
    before = state.read_bytes()
    for bad in (1e308, -1e308, REWARD_BOUND * 1.01, float("inf"), float("nan"), True, "0.5"):
        with pytest.raises(RewardError, match="^reward: must be"):
            core.feedback(d["decision_id"], bad)
    for bad in ([1e308, 0.0, 0.0], [0.0, 0.0, -2 * FEATURE_BOUND], [0.0, float("-inf"), 0.0]):
        col = next(i for i, v in enumerate(bad) if not abs(v) <= FEATURE_BOUND)
        with pytest.raises(FeatureError, match=rf"^features\[{col}\]: must be a finite number in \[-1e\+06, 1e\+06\] or missing"):
            core.decide(bad)
    with pytest.raises(BanditError, match=r"^prior_var: must be in \[1e-06, 1e\+06\], got 1e-09"):
        core.add_arm("fragile", prior_var=1e-9)
    assert state.read_bytes() == before
    assert core.feedback(d["decision_id"], -REWARD_BOUND)["status"] == "counted"  # the bound is allowed
    _, arrays = read_state(core.state_dir)
    assert all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


def test_a_context_unlike_the_offline_rows_is_flagged_not_refused(tmp_path: Path):
    """The planner flags inputs outside the selector's training rows; the bandit's answers do too
    (`out_of_range`, null inside), by the same rule, with a state loaded anew as with the live one."""
    z, r, _ = _linear_data(60, 3, 3, 0.1)
    enc = IdentityEncoder.fit(["s_0", "s_1", "f_2"], z)
    bandit = LinTS(3, ["linear", "slerp", "ties"], LinTSConfig(seed=1))
    bandit.warm_start(enc.encode(z), r)
    core = BanditCore.create(tmp_path / "state", enc, bandit)
    assert core.decide(z[3])["out_of_range"] is None
    far = z[3].copy()
    far[1] = enc.mean[1] + 40 * enc.scale[1]
    for live in (core, BanditCore(tmp_path / "state")):
        out = live.decide(far)["out_of_range"]
        assert (out["feature"], round(out["z"], 6)) == ("s_1", 40.0) and out["threshold"] < 5
        assert out["message"].startswith("s_1 at z = +40.0 is outside the offline rows") and "extrapolate" in out["message"]
    # A state written before encoders recorded their offline rows flags nothing, as it did then.
    settings = json.loads((tmp_path / "state" / SETTINGS_FILE).read_text())
    del settings["encoder"]["domain"]
    (tmp_path / "state" / SETTINGS_FILE).write_text(json.dumps(settings))
    assert BanditCore(tmp_path / "state").decide(far)["out_of_range"] is None


def test_a_missing_feature_is_imputed_and_named_and_an_empty_context_refused(tmp_path: Path):
    """Inside Python NaN is a missing value (JSON null over HTTP, where a NaN literal is refused).
    Only a column that can be undefined for a pair may be missing: one null in some offline row,
    or one measured on the joining model's own task (null for a task-less model); a null
    anywhere else is refused by name, without a trace, in the saved state as in the live one."""
    z, r, _ = _linear_data(60, 3, 3, 0.1)
    z[0, 1] = np.nan  # s_1: undefined for one offline pair
    enc = IdentityEncoder.fit(["s_0", "s_1", "f_kl_ab_mean_on_b_task"], z)
    bandit = LinTS(3, ["linear", "slerp", "ties"], LinTSConfig(seed=1))
    bandit.warm_start(enc.encode(z), r)
    core = BanditCore.create(tmp_path / "state", enc, bandit)
    d = core.decide([0.1, float("nan"), 0.3])
    assert d["imputed"] == ["s_1"] and core.decide([0.1, 0.2, 0.3])["imputed"] == []
    assert d["expected"] == pytest.approx(core.decide([0.1, core.encoder.mean[1], 0.3])["expected"], rel=1e-12)
    assert core.decide([0.1, 0.2, float("nan")])["imputed"] == ["f_kl_ab_mean_on_b_task"]  # never null offline
    before = core.stats()
    with pytest.raises(FeatureError, match="^features: every value is missing"):
        core.decide([float("nan")] * 3)
    for live in (core, BanditCore(tmp_path / "state")):
        with pytest.raises(FeatureError, match=r"^features: 's_0' is missing \(null\) but defined for every pair "
                                               r"offline; only columns undefined for some pair"):
            live.decide([float("nan"), 0.2, 0.3])
    assert core.stats() == before
    # A state written before encoders recorded `nullable` imputes any column, as it did then.
    settings = json.loads((tmp_path / "state" / SETTINGS_FILE).read_text())
    assert settings["encoder"].pop("nullable") == ["f_kl_ab_mean_on_b_task", "s_1"]
    (tmp_path / "state" / SETTINGS_FILE).write_text(json.dumps(settings))
    assert BanditCore(tmp_path / "state").decide([float("nan"), 0.2, 0.3])["imputed"] == ["s_0"]


def test_a_context_whose_scores_overflow_is_refused_without_a_trace(tmp_path: Path):
    # A frozen encoder with a tiny scale maps an in-bounds feature to 1e300: the draw's variance
    # x^T Sigma x overflows. The refusal must not even advance the generator.
    enc = IdentityEncoder(["s_0", "s_1"], np.zeros(2), np.array([1e-300, 1.0]))
    core = BanditCore.create(tmp_path / "state", enc, LinTS(2, ["a", "b"]))
    shutil.copytree(core.state_dir, tmp_path / "twin")
    before = (core.state_dir / STATE_FILE).read_bytes()
    with pytest.raises(FeatureError, match="^features: this context gives non-finite scores"):
        core.decide([1.0, 0.0])
    assert (core.state_dir / STATE_FILE).read_bytes() == before
    ctx = [1e-301, 0.5]
    twin = BanditCore(tmp_path / "twin")
    assert core.decide(ctx)["scores"] == twin.decide(ctx)["scores"]
    # Within a batch the refusal undoes its draw only, not the calls before it.
    batch = core.run([Call("decide", (ctx, None)), Call("decide", ([1.0, 0.0], None)), Call("decide", (ctx, None))])
    assert isinstance(batch[1], FeatureError) and batch[0]["seq"] == 1 and batch[2]["seq"] == 2
    assert [batch[0]["scores"], batch[2]["scores"]] == [twin.decide(ctx)["scores"], twin.decide(ctx)["scores"]]


def test_a_non_finite_state_is_never_saved_and_refused_on_load(core: BanditCore, tmp_path: Path):
    path = core.state_dir / STATE_FILE
    before, stats = path.read_bytes(), core.stats()
    meta, arrays = read_state(core.state_dir)
    arrays["lints_zr"][1, 0] = np.nan
    with pytest.raises(NonFiniteStateError, match=rf"{STATE_FILE}: not saved, array 'lints_zr' is not finite"):
        write_state(core.state_dir, meta, arrays)
    # The core's last line of defence: a mutation whose state cannot be saved is undone in memory.
    core.bandit.arms[0].rr = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"meta.lints.arms\[0\].rr is not finite"):
        core.add_arm("dare_ties")
    assert path.read_bytes() == before and core.stats() == stats and np.isfinite(core.bandit.arms[0].rr)
    assert sorted(p.name for p in core.state_dir.iterdir()) == [".simmerge-lock", ".simmerge-output.json", "bandit.json",
                                                                 STATE_FILE]
    # A state poisoned before this check existed (the old service saved NaN posteriors) is a clear
    # error naming the file, not a bandit that answers with null scores.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(core.state_dir, poisoned)
    meta["lints"]["arms"][2]["rr"] = float("nan")
    arrays["lints_zr"][1, 0] = 0.0
    np.savez(poisoned / STATE_FILE, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(CheckpointError, match=rf"poisoned/{STATE_FILE}: meta.lints.arms\[2\].rr is not finite"):
        BanditCore(poisoned)


def _damage_state(state_dir: Path, edit) -> None:
    meta, arrays = read_state(state_dir)
    edit(meta, arrays)
    np.savez(state_dir / STATE_FILE, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def _damage_settings(state_dir: Path, edit) -> None:
    settings = json.loads((state_dir / SETTINGS_FILE).read_text())
    edit(settings)
    (state_dir / SETTINGS_FILE).write_text(json.dumps(settings))


@pytest.mark.parametrize("damage, where, needle", [
    (lambda d: _damage_state(d, lambda m, a: m.pop("counters")), STATE_FILE, "(missing field 'counters')"),
    (lambda d: _damage_state(d, lambda m, a: a.pop("pending_seq")), STATE_FILE, "(missing field 'pending_seq')"),
    (lambda d: _damage_state(d, lambda m, a: m["lints"]["config"].update(surprise=1)), STATE_FILE,
     "unexpected keyword argument 'surprise'"),
    (lambda d: _damage_settings(d, lambda s: s.pop("max_done")), SETTINGS_FILE, "(missing field 'max_done')"),
    (lambda d: _damage_settings(d, lambda s: s.update(max_pending="many")), SETTINGS_FILE,
     "('max_pending' is 'many', not a count of at least 1)"),
    (lambda d: _damage_settings(d, lambda s: s.update(max_done=True)), SETTINGS_FILE,
     "('max_done' is True, not a count of at least 1)"),
    (lambda d: _damage_settings(d, lambda s: s.pop("version")), SETTINGS_FILE, "(missing field 'version')"),
    (lambda d: _damage_settings(d, lambda s: s.update(version=2)), SETTINGS_FILE, "this simmerge reads version 1"),
    (lambda d: _damage_settings(d, lambda s: s.update(feature_table=5)), SETTINGS_FILE,
     "('feature_table' is 5, not a path or null)"),
])
def test_a_damaged_state_is_one_error_naming_the_file_and_field(core: BanditCore, tmp_path: Path, damage, where,
                                                                needle: str):
    """A state file that parses but lacks a field used to surface as a bare KeyError or TypeError."""
    damaged = tmp_path / "damaged"
    shutil.copytree(core.state_dir, damaged)
    damage(damaged)
    with pytest.raises(CheckpointError) as e:
        BanditCore(damaged)
    assert str(e.value).startswith(f"{damaged / where}: damaged bandit state") and needle in str(e.value), e.value


def test_serve_names_a_bad_state_or_feature_table_before_starting_ray(core: BanditCore, tmp_path: Path, capsys):
    """A missing feature table, a truncated state.npz or a non-UTF-8 bandit.json: one line, exit
    2, before Ray (they used to fail after the deployment started, with a traceback)."""
    args = ["serve", "--state", str(core.state_dir), "--token-file", str(tmp_path / "none")]
    assert cli_main([*args, "--features", str(tmp_path / "nope.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{tmp_path / 'nope.parquet'}: feature table not found") and len(err.splitlines()) == 1
    state = core.state_dir / STATE_FILE
    state.write_bytes(state.read_bytes()[:50])
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{state}: unreadable bandit state (BadZipFile" in err and len(err.splitlines()) == 1
    (core.state_dir / "bandit.json").write_bytes(b"\xff\xfe{")
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "bandit.json: not valid JSON" in err and len(err.splitlines()) == 1
