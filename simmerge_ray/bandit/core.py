"""The bandit service's state machine, without Ray: encoder + LinTS + a ledger of decisions.

Inputs are checked against the bounds of limits.py, and whatever would leave a NaN or Inf in
the bandit (a context whose scores overflow, an update, a state to save) is refused with the
state unchanged, in memory and on disk. Every mutation (a decision, a counted feedback, a new
arm) is written to the state folder before the call returns, so whatever a client was told
survives a crash of the process that told it: a decision id handed out is pending on disk, and
its feedback counts after a restart. Feedback is idempotent by decision id: a repeated id is
acknowledged as a duplicate and not learned twice. The ledger is bounded (oldest pending
decisions expire, oldest answered ids are forgotten) so that the state file, rewritten on every
update, stays small.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.bandit.encoder import Encoder, load_encoder
from simmerge_ray.bandit.errors import BanditError, FeatureError, NonFiniteStateError, UnknownDecisionError
from simmerge_ray.bandit.limits import check_features, check_prior_var, check_reward
from simmerge_ray.bandit.lints import LinTS
from simmerge_ray.bandit.state import (
    SETTINGS_FILE,
    read_settings,
    read_state,
    remove_stale_temporaries,
    write_settings,
    write_state,
)

PriorKind = Literal["pooled", "zero"]


@dataclass
class Pending:
    """A decision handed out and not yet rewarded: what the update needs, nothing more."""

    arm: str
    z: np.ndarray
    seq: int


class BanditCore:
    """Load a state folder, serve decide/feedback/add_arm/stats, persist after each mutation."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.settings = read_settings(self.state_dir)
        self.encoder: Encoder = load_encoder(self.settings["encoder"])
        self._load()
        remove_stale_temporaries(self.state_dir)

    def _load(self) -> None:
        """(Re)read the mutable state from disk: at start, and to undo a refused mutation."""
        meta, arrays = read_state(self.state_dir)
        lints_arrays = {k.removeprefix("lints_"): v for k, v in arrays.items() if k.startswith("lints_")}
        self.bandit = LinTS.from_state(meta["lints"], lints_arrays)
        if self.bandit.width != self.encoder.width:
            raise CheckpointError(
                f"{self.state_dir}: bandit width {self.bandit.width} != encoder width {self.encoder.width}"
            )
        names = self.bandit.arm_names
        self.pending: OrderedDict[str, Pending] = OrderedDict(
            (d.decode(), Pending(names[int(a)], z.copy(), int(s)))
            for d, a, z, s in zip(
                arrays["pending_id"], arrays["pending_arm"], arrays["pending_z"], arrays["pending_seq"]
            )
        )
        self.done: OrderedDict[str, tuple[str, float]] = OrderedDict(
            (d.decode(), (names[int(a)], float(r)))
            for d, a, r in zip(arrays["done_id"], arrays["done_arm"], arrays["done_reward"])
        )
        self.counters: dict[str, int] = dict(meta["counters"])

    @classmethod
    def create(
        cls,
        state_dir: Path,
        encoder: Encoder,
        bandit: LinTS,
        *,
        feature_table: Path | None = None,
        max_pending: int = 1000,
        max_done: int = 2000,
        overwrite: bool = False,
    ) -> BanditCore:
        """Write a fresh state folder (settings + initial state) and load it."""
        state_dir = Path(state_dir)
        if (state_dir / SETTINGS_FILE).exists() and not overwrite:
            raise CheckpointError(f"{state_dir}: a bandit state already exists (pass overwrite)")
        if encoder.width != bandit.width:
            raise ConfigError(f"encoder width {encoder.width} != bandit width {bandit.width}")
        if max_pending < 1 or max_done < 1:
            raise ConfigError("max_pending and max_done must be >= 1")
        settings = {
            "version": 1,
            "encoder": encoder.spec(),
            "feature_table": str(Path(feature_table).resolve()) if feature_table else None,
            "max_pending": max_pending,
            "max_done": max_done,
        }
        counters = {"decisions": 0, "feedback": 0, "duplicates": 0, "expired": 0}
        # Built beside and renamed into place: a folder that is not a bandit state simmerge wrote
        # (a user's, or one holding the feature table) is never written into or replaced.
        with atomic_output_dir(state_dir, overwrite=overwrite, inputs=[feature_table] if feature_table else []) as tmp:
            write_settings(tmp, settings)
            _write(tmp, bandit, OrderedDict(), OrderedDict(), counters)
        return cls(state_dir)

    # ----- requests
    def decide(self, x: Sequence[float] | np.ndarray, arms: Sequence[str] | None = None) -> dict[str, Any]:
        """Encode raw features, Thompson-sample an arm (among `arms` if given), record it as pending.
        Missing values (NaN) are imputed by the encoder and named in the answer's `imputed`."""
        x = check_features(x, len(self.encoder.feature_names))
        missing = np.isnan(x[0])
        if missing.all():
            raise FeatureError("features: every value is missing (null): nothing to decide on")
        nullable = self.encoder.nullable
        wrong = [n for n, m in zip(self.encoder.feature_names, missing) if m and nullable is not None and n not in nullable]
        if wrong:
            raise FeatureError(f"features: {wrong[0]!r} is missing (null) but defined for every pair offline; only "
                               f"columns undefined for some pair (e.g. *_on_b_task) may be null"
                               + (f" ({len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        allowed = None if arms is None else sorted({self.bandit.arm_index(a) for a in arms})
        if allowed == []:
            raise BanditError("'arms' must name at least one arm")
        z = self.encoder.encode(x)[0]
        with np.errstate(all="ignore"):
            arm, draws = self.bandit.choose(z, allowed)
            means = self.bandit.mean_scores(z)[0]
        if not (np.all(np.isfinite(draws)) and np.all(np.isfinite(means))):
            self._load()  # rewind the generator: a refused request leaves no trace
            raise FeatureError("features: this context gives non-finite scores (values far outside "
                               "the encoder's range); refused")
        names = self.bandit.arm_names
        seq = self.counters["decisions"]
        decision_id = uuid.uuid4().hex
        self.pending[decision_id] = Pending(names[arm], z, seq)
        while len(self.pending) > self.settings["max_pending"]:
            self.pending.popitem(last=False)
            self.counters["expired"] += 1
        self.counters["decisions"] = seq + 1
        self._persist()
        return {
            "decision_id": decision_id,
            "operator": names[arm],
            "scores": {n: float(s) for n, s in zip(names, draws)},
            "expected": {n: float(m) for n, m in zip(names, means)},
            "seq": seq,
            # undefined for this pair, so imputed with the offline mean: said, never silent
            "imputed": [n for n, m in zip(self.encoder.feature_names, missing) if m],
        }

    def feedback(self, decision_id: str, reward: float) -> dict[str, Any]:
        """Learn from the reward of a pending decision; a repeated id is a no-op duplicate."""
        reward = check_reward(reward)
        if decision_id in self.done:
            arm, first = self.done[decision_id]
            self.counters["duplicates"] += 1
            self._persist()
            return {"decision_id": decision_id, "operator": arm, "status": "duplicate", "reward": first}
        decision = self.pending.get(decision_id)
        if decision is None:
            raise UnknownDecisionError(f"unknown decision id {decision_id!r} (never made, or expired)")
        self.bandit.update(decision.arm, decision.z, reward)
        del self.pending[decision_id]
        self.done[decision_id] = (decision.arm, reward)
        while len(self.done) > self.settings["max_done"]:
            self.done.popitem(last=False)
        self.counters["feedback"] += 1
        self._persist()
        return {"decision_id": decision_id, "operator": decision.arm, "status": "counted", "reward": reward}

    def add_arm(self, name: str, prior: PriorKind = "pooled", prior_var: float | None = None) -> dict[str, Any]:
        """Add an operator. 'pooled' starts it at the average of the current arms' posteriors."""
        if not name or not name.strip():
            raise BanditError("arm name must be a non-empty string")
        if prior not in ("pooled", "zero"):
            raise BanditError(f"arm {name!r}: prior must be 'pooled' or 'zero', got {prior!r}")
        mean = self.bandit.pooled_prior_mean() if prior == "pooled" else None
        self.bandit.add_arm(name, prior_mean=mean, prior_var=check_prior_var(prior_var))
        self._persist()
        return {"arm": name, "arms": self.bandit.arm_names}

    def stats(self) -> dict[str, Any]:
        arms = [
            {
                "name": a.name,
                "plays": a.plays,
                "mean_reward": a.reward_sum / a.plays if a.plays else None,
                "data_weight": a.weight,
                "prior_var": a.prior_var,
            }
            for a in self.bandit.arms
        ]
        return {
            **self.counters,
            "pending": len(self.pending),
            "arms": arms,
            "noise_var": self.bandit.noise_var,
            "encoder": self.settings["encoder"]["kind"],
            "feature_names": list(self.encoder.feature_names),
            "encoded_width": self.encoder.width,
        }

    # ----- persistence
    def _persist(self) -> None:
        """Save; a state that cannot be saved (non-finite) is undone in memory too, then refused."""
        try:
            _write(self.state_dir, self.bandit, self.pending, self.done, self.counters)
        except NonFiniteStateError:
            self._load()
            raise


def _write(
    state_dir: Path,
    bandit: LinTS,
    pending: OrderedDict[str, Pending],
    done: OrderedDict[str, tuple[str, float]],
    counters: dict[str, int],
) -> None:
    """One atomic state file; the ledger goes in arrays (JSON of thousands of ids is too slow)."""
    lints_meta, lints_arrays = bandit.to_state()
    index = {n: i for i, n in enumerate(bandit.arm_names)}
    arrays = {f"lints_{k}": v for k, v in lints_arrays.items()}
    arrays["pending_id"] = np.array(list(pending), dtype="S32")
    arrays["pending_arm"] = np.array([index[p.arm] for p in pending.values()], dtype=np.int32)
    arrays["pending_seq"] = np.array([p.seq for p in pending.values()], dtype=np.int64)
    arrays["pending_z"] = np.array([p.z for p in pending.values()]).reshape(len(pending), bandit.width)
    arrays["done_id"] = np.array(list(done), dtype="S32")
    arrays["done_arm"] = np.array([index[a] for a, _ in done.values()], dtype=np.int32)
    arrays["done_reward"] = np.array([r for _, r in done.values()], dtype=np.float64)
    write_state(state_dir, {"lints": lints_meta, "counters": counters}, arrays)
