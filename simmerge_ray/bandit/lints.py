"""Linear Thompson sampling with one Bayesian linear regression per arm (pure numpy).

Each arm o models the reward as r = w_o . [z, 1] + noise, noise ~ N(0, noise_var), with a
Gaussian prior w_o ~ N(m_o, prior_var I). Arms keep sufficient statistics (sum z z^T, sum z r,
sum r^2) rather than the posterior itself, so warm starting from offline full-information data is
one matrix product per arm and the noise variance can be re-estimated afterwards.

Thompson sampling for one context only needs the marginal of the sampled score x.w_o, which is
N(x.mu_o, x^T Sigma_o x): drawing that scalar per arm is the same policy as drawing the whole
weight vector and costs one normal draw per arm.

By default every update re-solves the played arm's posterior from its statistics (an
eigendecomposition, O(p^3)), so a decision depends on the saved state alone. A bandit with
`incremental = True` (the replay simulator's) instead updates the cached posterior by the
Sherman-Morrison rank-one formula, O(p^2), takes an arm without data to be its prior (no
solve), and re-solves exactly every `REFRESH_EVERY` updates of an arm: the same posterior up to
round-off (as close to exact arithmetic as the re-solve's; docs/bandit.md, "Cost of a replay"),
O(p^2) instead of O(p^3), and no LAPACK call at all in a replay of up to `REFRESH_EVERY` rounds
(a multithreaded eigendecomposition of a small matrix is slow on a busy machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.bandit.errors import DuplicateArmError, NonFiniteUpdateError, RewardError, UnknownNameError

NOISE_VAR_FLOOR = 1e-4
REFRESH_EVERY = 1000  # rank-one posterior updates of an arm between two exact solves (a drift guard)


@dataclass(frozen=True)
class LinTSConfig:
    """Hyper-parameters. `exploration` scales the posterior std when sampling (1 = plain TS)."""

    noise_var: float = 0.04
    prior_var: float = 1.0
    exploration: float = 1.0
    intercept: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise_var", "prior_var"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"bandit config: {name} must be a positive number, got {value}")
        if not (np.isfinite(self.exploration) and self.exploration >= 0):
            raise ConfigError(f"bandit config: exploration must be >= 0, got {self.exploration}")


@dataclass
class ArmStats:
    """Prior and sufficient statistics of one arm; `plays`/`reward_sum` count online rewards only."""

    name: str
    prior_mean: np.ndarray  # [p]
    prior_var: float
    gram: np.ndarray  # [p, p] sum of weight * x x^T
    zr: np.ndarray  # [p] sum of weight * x r
    rr: float = 0.0  # sum of weight * r^2
    weight: float = 0.0  # sum of weights (offline rows weighted, online rows 1)
    plays: int = 0
    reward_sum: float = 0.0


class LinTS:
    """The bandit: arms in insertion order, a seeded generator, cached posteriors."""

    def __init__(self, width: int, arms: Sequence[str] = (), config: LinTSConfig = LinTSConfig()):
        if width < 0:
            raise ConfigError(f"bandit: feature width must be >= 0, got {width}")
        self.width = int(width)
        self.config = config
        self.noise_var = config.noise_var
        self.rng = np.random.default_rng(config.seed)
        self._arms: list[ArmStats] = []
        self._posterior: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.incremental = False  # rank-one posterior updates (in memory only; see the module docstring)
        self._rank_one: dict[int, int] = {}  # arm -> rank-one updates since its last exact solve
        for name in arms:
            self.add_arm(name)

    # ----- shape helpers
    @property
    def dim(self) -> int:
        """Width of the regression input: the encoded features plus the intercept."""
        return self.width + int(self.config.intercept)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self._arms]

    @property
    def arms(self) -> tuple[ArmStats, ...]:
        return tuple(self._arms)

    def arm_index(self, name: str) -> int:
        for i, arm in enumerate(self._arms):
            if arm.name == name:
                return i
        raise UnknownNameError(f"unknown arm {name!r} (known: {self.arm_names})")

    def design(self, z: np.ndarray) -> np.ndarray:
        """[n, width] encoded features -> [n, dim] regression inputs."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        if z.shape[1] != self.width:
            raise ConfigError(f"bandit: encoded width {z.shape[1]} != {self.width}")
        if self.config.intercept:
            z = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
        return z

    # ----- arms
    def add_arm(
        self, name: str, prior_mean: np.ndarray | None = None, prior_var: float | None = None
    ) -> int:
        """Add an arm with prior N(prior_mean, prior_var I) (default: zero mean, config variance)."""
        if any(a.name == name for a in self._arms):
            raise DuplicateArmError(f"arm {name!r} already exists")
        p = self.dim
        mean = np.zeros(p) if prior_mean is None else np.asarray(prior_mean, dtype=np.float64)
        var = self.config.prior_var if prior_var is None else float(prior_var)
        if mean.shape != (p,) or not np.all(np.isfinite(mean)):
            raise ConfigError(f"arm {name!r}: prior mean must be {p} finite numbers")
        if not (np.isfinite(var) and var > 0):
            raise ConfigError(f"arm {name!r}: prior variance must be positive, got {var}")
        self._arms.append(ArmStats(name, mean, var, np.zeros((p, p)), np.zeros(p)))
        return len(self._arms) - 1

    def pooled_prior_mean(self) -> np.ndarray:
        """Average posterior mean of the existing arms: a new operator starts as 'typical'."""
        if not self._arms:
            return np.zeros(self.dim)
        return np.mean([self.posterior(i)[0] for i in range(len(self._arms))], axis=0)

    # ----- posterior
    def posterior(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean [p], covariance [p, p]) of arm i's weights."""
        if i not in self._posterior:
            arm = self._arms[i]
            if self.incremental and arm.weight == 0 and not arm.gram.any():  # the prior itself
                self._posterior[i] = (arm.prior_mean.copy(), np.eye(self.dim) * arm.prior_var)
            else:
                self._posterior[i] = self._solve(arm)
            self._rank_one.pop(i, None)
        return self._posterior[i]

    def _solve(self, arm: ArmStats) -> tuple[np.ndarray, np.ndarray]:
        """Posterior from the eigendecomposition of the Gram matrix: I/a + G/s is positive
        definite by construction (G's eigenvalues clipped at 0), where a Cholesky factor of it
        failed once round-off left G an eigenvalue of -1e-10 against a large prior variance."""
        eigenvalues, vectors = np.linalg.eigh((arm.gram + arm.gram.T) / 2)
        precision = 1.0 / arm.prior_var + np.clip(eigenvalues, 0.0, None) / self.noise_var
        cov = (vectors / precision) @ vectors.T
        mean = cov @ (arm.prior_mean / arm.prior_var + arm.zr / self.noise_var)
        return mean, cov

    def mean_scores(self, z: np.ndarray) -> np.ndarray:
        """Posterior-mean rewards [n, k] for encoded features [n, width] (the greedy policy)."""
        x = self.design(z)
        if not self._arms:
            return np.zeros((x.shape[0], 0))
        means = np.stack([self.posterior(i)[0] for i in range(len(self._arms))], axis=1)
        return x @ means

    def sample_scores(self, z: np.ndarray) -> np.ndarray:
        """One Thompson draw of every arm's reward for one encoded context [width]."""
        x = self.design(z)[0]
        k = len(self._arms)
        if k == 0:
            raise ConfigError("bandit: no arms to choose from")
        mu = np.empty(k)
        sd = np.empty(k)
        for i in range(k):
            mean, cov = self.posterior(i)
            mu[i] = x @ mean
            sd[i] = np.sqrt(max(float(x @ cov @ x), 0.0))
        return mu + self.config.exploration * sd * self.rng.standard_normal(k)

    def choose(self, z: np.ndarray, allowed: Sequence[int] | None = None) -> tuple[int, np.ndarray]:
        """Thompson sampling: (index of the arm with the highest draw, all draws).

        Every arm is drawn whatever `allowed` says, so the generator advances the same way.
        """
        scores = self.sample_scores(z)
        if allowed is None:
            return int(np.argmax(scores)), scores
        allowed = list(allowed)
        return allowed[int(np.argmax(scores[allowed]))], scores

    # ----- learning
    def update(self, arm: int | str, z: np.ndarray, reward: float) -> None:
        """Online update of the played arm only; refused, the arm unchanged, if its statistics or
        posterior would stop being finite (the bandit must never learn, or save, a NaN)."""
        i = self.arm_index(arm) if isinstance(arm, str) else int(arm)
        if not np.isfinite(reward):
            raise RewardError(f"reward must be a finite number, got {reward}")
        x = self.design(z)[0]
        a = self._arms[i]
        with np.errstate(all="ignore"):
            new = replace(a, gram=a.gram + np.outer(x, x), zr=a.zr + x * reward, rr=a.rr + reward * reward,
                          weight=a.weight + 1.0, plays=a.plays + 1, reward_sum=a.reward_sum + float(reward))
        what = f"reward: learning {reward:g}"
        done = self._rank_one.get(i, 0)
        if self.incremental and i in self._posterior and done < REFRESH_EVERY:
            self._posterior[i] = self._checked_rank_one(new, self._posterior[i], x, reward, what)
            self._rank_one[i] = done + 1
        else:
            self._posterior[i] = self._checked_solve(new, what)
            self._rank_one.pop(i, None)
        self._arms[i] = new

    def _checked_rank_one(self, arm: ArmStats, posterior: tuple[np.ndarray, np.ndarray], x: np.ndarray,
                          reward: float, what: str) -> tuple[np.ndarray, np.ndarray]:
        """The posterior after one more row (x, reward) by Sherman-Morrison: the precision gains
        x x^T / noise_var, so cov' = cov - u u^T / d and mean' = mean + u (reward - x.mean) / d
        with u = cov x, d = noise_var + x.u. NonFiniteUpdateError as `_checked_solve`."""
        mean, cov = posterior
        with np.errstate(all="ignore"):
            u = cov @ x
            d = self.noise_var + float(x @ u)
            mean = mean + u * ((reward - float(x @ mean)) / d)
            cov = cov - np.outer(u, u) / d  # u_i u_j = u_j u_i: stays exactly symmetric
        self._check_finite(arm, mean, cov, what)
        return mean, cov

    def _checked_solve(self, arm: ArmStats, what: str) -> tuple[np.ndarray, np.ndarray]:
        """The posterior of `arm`, or NonFiniteUpdateError if it or the statistics are not finite."""
        with np.errstate(all="ignore"):
            try:
                mean, cov = self._solve(arm)
            except np.linalg.LinAlgError:  # statistics that are no longer finite
                mean = cov = np.array([np.nan])
        self._check_finite(arm, mean, cov, what)
        return mean, cov

    @staticmethod
    def _check_finite(arm: ArmStats, mean: np.ndarray, cov: np.ndarray, what: str) -> None:
        arrays = (arm.prior_mean, arm.gram, arm.zr, mean, cov)
        if not (math.isfinite(arm.rr) and math.isfinite(arm.reward_sum) and all(np.isfinite(v).all() for v in arrays)):
            raise NonFiniteUpdateError(f"{what} would make arm {arm.name!r}'s posterior non-finite; "
                                       "refused, the bandit is unchanged")

    def warm_start(
        self, z: np.ndarray, rewards: np.ndarray, *, weight: float = 1.0, fit_noise: bool = True
    ) -> None:
        """Absorb offline full-information data: z [n, width], rewards [n, k] in arm order.

        NaN rewards mean 'not measured' and are skipped for that arm. `weight` discounts the
        offline rows (a power prior). With `fit_noise`, the noise variance becomes the pooled
        residual variance of the fitted means (if there are more rows than parameters).
        """
        x = self.design(z)
        r = np.asarray(rewards, dtype=np.float64)
        k = len(self._arms)
        if r.shape != (x.shape[0], k):
            raise ConfigError(f"warm start: rewards shape {r.shape} != ({x.shape[0]}, {k})")
        if not (np.isfinite(weight) and weight > 0):
            raise ConfigError(f"warm start: weight must be positive, got {weight}")
        if np.isinf(r).any():
            raise RewardError("warm start: rewards contain Inf")
        for i, arm in enumerate(self._arms):
            seen = np.isfinite(r[:, i])
            xi, ri = x[seen], r[seen, i]
            arm.gram += weight * xi.T @ xi
            arm.zr += weight * xi.T @ ri
            arm.rr += weight * float(ri @ ri)
            arm.weight += weight * float(seen.sum())
        self._posterior.clear()
        if fit_noise:
            self._fit_noise()

    def _fit_noise(self) -> None:
        total = sum(a.weight for a in self._arms)
        dof = total - self.dim * len(self._arms)
        if dof <= 0:
            return
        sse = 0.0
        for i, a in enumerate(self._arms):
            mean, _ = self.posterior(i)
            sse += a.rr - 2 * mean @ a.zr + mean @ a.gram @ mean
        self.noise_var = max(float(sse) / dof, NOISE_VAR_FLOOR)
        self._posterior.clear()

    # ----- hyper-parameters from the offline data
    def log_evidence(self, i: int, prior_var: float, noise_var: float, memo: dict[Any, Any] | None = None) -> float:
        """log p(rewards | prior_var, noise_var) of arm i's absorbed rows, weights integrated out.

        r - X m ~ N(0, noise_var I + prior_var X X^T); by Woodbury only the sufficient statistics
        are needed: n log s + log det(I + (a/s) G) + (R - u^T (s/a I + G)^{-1} u) / s, with
        R = |r - X m|^2 and u = X^T (r - X m), up to the constant n log 2 pi.

        Both factorisations depend on the ratio a/s alone: `memo` (one dict, for one state of
        the arms) keeps them by the exact float ratio, so a grid of (a, s) with repeated ratios
        factorises each once and gets the very numbers it would have computed again.
        """
        memo = {} if memo is None else memo
        arm = self._arms[i]
        a, s = float(prior_var), float(noise_var)
        m, g = arm.prior_mean, arm.gram
        if ("u", i) not in memo:
            memo["u", i] = (arm.zr - g @ m, arm.rr - 2 * m @ arm.zr + m @ g @ m, np.eye(self.dim))
        u, resid, eye = memo["u", i]
        if ("logdet", i, a / s) not in memo:
            memo["logdet", i, a / s] = np.linalg.slogdet(eye + (a / s) * g)[1]
        if ("uSu", i, s / a) not in memo:
            memo["uSu", i, s / a] = u @ np.linalg.solve(eye * (s / a) + g, u)
        logdet, quad = memo["logdet", i, a / s], resid - memo["uSu", i, s / a]
        return -0.5 * (arm.weight * np.log(2 * np.pi * s) + logdet + quad / s)

    def fit_evidence(self, prior_vars: Sequence[float] = tuple(np.logspace(-6, 1, 22)),
                     noise_vars: Sequence[float] = tuple(np.logspace(-4, 0, 13))) -> tuple[float, float]:
        """Empirical Bayes: the (prior variance, noise variance) on the grid that maximises the
        summed evidence of every arm's absorbed (offline) rows; both are set, and returned.

        With tens of features and about as many offline contexts, a fixed prior variance either
        lets a warm-started arm overfit its rows (and explore too much) or ignores them; the
        evidence chooses from the data alone, never from the rewards it will be judged on.
        """
        if not self._arms or all(a.weight == 0 for a in self._arms):
            raise ConfigError("bandit: no absorbed rows to fit the prior and noise variances on")
        memo: dict[Any, Any] = {}
        best = max(((sum(self.log_evidence(i, a, s, memo) for i in range(len(self._arms))), a, s)
                    for a in prior_vars for s in noise_vars))
        _, prior_var, noise_var = best
        self._arms = [replace(arm, prior_var=float(prior_var)) for arm in self._arms]
        self.noise_var = float(noise_var)
        self._posterior.clear()
        return float(prior_var), float(noise_var)

    # ----- serialisation
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) that `from_state` turns back into an identical bandit."""
        meta = {
            "config": asdict(self.config),
            "width": self.width,
            "noise_var": self.noise_var,
            "rng": self.rng.bit_generator.state,
            "arms": [
                {
                    "name": a.name,
                    "prior_var": a.prior_var,
                    "rr": a.rr,
                    "weight": a.weight,
                    "plays": a.plays,
                    "reward_sum": a.reward_sum,
                }
                for a in self._arms
            ],
        }
        p, k = self.dim, len(self._arms)
        arrays = {
            "prior_mean": np.array([a.prior_mean for a in self._arms]).reshape(k, p),
            "gram": np.array([a.gram for a in self._arms]).reshape(k, p, p),
            "zr": np.array([a.zr for a in self._arms]).reshape(k, p),
        }
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> LinTS:
        bandit = cls(meta["width"], (), LinTSConfig(**meta["config"]))
        bandit.noise_var = float(meta["noise_var"])
        bandit.rng.bit_generator.state = meta["rng"]
        for i, a in enumerate(meta["arms"]):
            bandit._arms.append(
                ArmStats(
                    name=a["name"],
                    prior_mean=np.array(arrays["prior_mean"][i], dtype=np.float64),
                    prior_var=float(a["prior_var"]),
                    gram=np.array(arrays["gram"][i], dtype=np.float64),
                    zr=np.array(arrays["zr"][i], dtype=np.float64),
                    rr=float(a["rr"]),
                    weight=float(a["weight"]),
                    plays=int(a["plays"]),
                    reward_sum=float(a["reward_sum"]),
                )
            )
        return bandit
