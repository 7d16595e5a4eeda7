"""The bandit service's state machine, without Ray: encoder + LinTS + a ledger of decisions.

Inputs are checked against the bounds of limits.py, and whatever would leave a NaN or Inf in
the bandit (a context whose scores overflow, an update, a state to save) is refused with the
state unchanged, in memory and on disk. Every mutation (a decision, a counted feedback, a new
arm) is written to the state folder before the call returns, so whatever a client was told
survives a crash of the process that told it: a decision id handed out is pending on disk, and
its feedback counts after a restart. Calls that arrive together are answered as one batch
(`BanditCore.run`): applied in order, each refused alone, and saved with one write, so a busy
service writes its state once per batch rather than once per request (group commit). Feedback
is idempotent by decision id: a repeated id is acknowledged as a duplicate and not learned
twice. The ledger is bounded (oldest pending decisions expire, oldest answered ids are
forgotten) so that the state file, rewritten by every batch, stays small.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from simmerge_ray.errors import CheckpointError, ConfigError, SimMergeError
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.out_checks import LOCK_FILE
from simmerge_ray.bandit.calls import MUTATIONS, Answer, Call, unwrap
from simmerge_ray.bandit.encoder import Encoder, load_encoder, out_of_range
from simmerge_ray.bandit.errors import BanditError, FeatureError, NonFiniteStateError, UnknownDecisionError
from simmerge_ray.bandit.limits import check_features, check_prior_var, check_reward
from simmerge_ray.bandit.lints import LinTS
from simmerge_ray.bandit.state import (
    SETTINGS_FILE,
    SETTINGS_VERSION,
    STATE_FILE,
    SeenFile,
    damaged,
    folder_lock,
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
    trusted: bool = False  # asked for with the write token: not evicted by anonymous decisions


def check_new_state(state_dir: Path, overwrite: bool) -> None:
    """A state folder is replaced only when asked: checked by `bandit-init` before its warm start's
    work, and again when the state is written."""
    if (Path(state_dir) / SETTINGS_FILE).exists() and not overwrite:
        raise CheckpointError(f"{state_dir}: a bandit state already exists (pass --overwrite to replace it)")


class BanditCore:
    """Load a state folder, serve decide/feedback/add_arm/stats in batches (`run`), persist each
    batch. Several processes may serve one folder: each batch runs on the newest saved state, and
    a save never overwrites one it has not seen."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.settings = read_settings(self.state_dir)
        with damaged(self.state_dir / SETTINGS_FILE):
            if self.settings["version"] != SETTINGS_VERSION:
                raise ValueError(f"'version' is {self.settings['version']!r}; this simmerge reads version "
                                 f"{SETTINGS_VERSION} (create the state anew with `simmerge bandit-init`)")
            table = self.settings["feature_table"]
            if table is not None and not (isinstance(table, str) and table):
                raise ValueError(f"'feature_table' is {table!r}, not a path or null")
            for key in ("max_pending", "max_done"):
                value = self.settings[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{key!r} is {value!r}, not a count of at least 1")
            self.encoder: Encoder = load_encoder(self.settings["encoder"])
        self._seen: SeenFile | None = None
        self.saves = 0  # state writes by this object: fewer than its calls where they came in batches
        with folder_lock(self.state_dir):  # no writer is mid-save while this is held
            self._load()
            remove_stale_temporaries(self.state_dir)

    def _load(self) -> None:
        """(Re)read the mutable state from disk (the caller holds the folder's lock): at start,
        after another process saved, and to undo a refused mutation. All or nothing: a state that
        does not load leaves this process marked as having seen none, so every later request
        tries again and none saves over it."""
        if self._seen is not None:
            self._seen.close()
            self._seen = None
        if read_settings(self.state_dir) != self.settings:
            raise CheckpointError(f"{self.state_dir}: the bandit state was created anew since this process "
                                  "loaded it (`bandit-init --overwrite`); restart the service")
        seen = SeenFile(self.state_dir / STATE_FILE) if (self.state_dir / STATE_FILE).is_file() else None
        try:
            meta, arrays = read_state(self.state_dir)
            with damaged(self.state_dir / STATE_FILE):
                self.bandit, self.pending, self.done, self.counters = self._unpack(meta, arrays)
        except BaseException:
            if seen is not None:
                seen.close()
            raise
        self._seen = seen

    def _unpack(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> tuple[LinTS, OrderedDict[str, Pending], OrderedDict[str, tuple[str, float]], dict[str, int]]:
        """The in-memory state from a state file's JSON part and arrays."""
        lints_arrays = {k.removeprefix("lints_"): v for k, v in arrays.items() if k.startswith("lints_")}
        bandit = LinTS.from_state(meta["lints"], lints_arrays)
        if bandit.width != self.encoder.width:
            raise CheckpointError(
                f"{self.state_dir}: bandit width {bandit.width} != encoder width {self.encoder.width}"
            )
        names = bandit.arm_names
        # a state written before decisions could be asked for with the token has no trusted ones
        trusted = arrays.get("pending_trusted", np.zeros(len(arrays["pending_id"]), dtype=bool))
        pending: OrderedDict[str, Pending] = OrderedDict(
            (d.decode(), Pending(names[int(a)], z.copy(), int(s), bool(t)))
            for d, a, z, s, t in zip(
                arrays["pending_id"], arrays["pending_arm"], arrays["pending_z"], arrays["pending_seq"], trusted,
                strict=True,
            )
        )
        done: OrderedDict[str, tuple[str, float]] = OrderedDict(
            (d.decode(), (names[int(a)], float(r)))
            for d, a, r in zip(arrays["done_id"], arrays["done_arm"], arrays["done_reward"])
        )
        return bandit, pending, done, dict(meta["counters"])

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
        check_new_state(state_dir, overwrite)
        if encoder.width != bandit.width:
            raise ConfigError(f"encoder width {encoder.width} != bandit width {bandit.width}")
        if max_pending < 1 or max_done < 1:
            raise ConfigError("max_pending and max_done must be >= 1")
        settings = {
            "version": SETTINGS_VERSION,
            "encoder": encoder.spec(),
            "feature_table": str(Path(feature_table).resolve()) if feature_table else None,
            "max_pending": max_pending,
            "max_done": max_done,
        }
        counters = {"decisions": 0, "feedback": 0, "duplicates": 0, "expired": 0}
        # Built beside and renamed into place: a folder that is not a bandit state simmerge wrote
        # (a user's, or one holding the feature table) is never written into or replaced.
        inputs = [p for p in (feature_table, getattr(encoder, "path", None)) if p]  # never written into
        with atomic_output_dir(state_dir, overwrite=overwrite, inputs=inputs, option="--state") as tmp:
            write_settings(tmp, settings)
            _write(tmp, bandit, OrderedDict(), OrderedDict(), counters)
        return cls(state_dir)

    # ----- requests
    def decide(self, x: Sequence[float] | np.ndarray, arms: Sequence[str] | None = None, *,
               trusted: bool = False) -> dict[str, Any]:
        """Encode raw features, Thompson-sample an arm (among `arms` if given), record it as pending.
        Missing values (NaN) are imputed by the encoder and named in the answer's `imputed`.
        Trusted decisions (asked for with the write token) and anonymous ones each keep up to
        `max_pending` pending, so a flood of anonymous decisions cannot expire a trusted one."""
        return unwrap(self.run([Call("decide", (x, arms), {"trusted": trusted})])[0])

    def feedback(self, decision_id: str, reward: float) -> dict[str, Any]:
        """Learn from the reward of a pending decision; a repeated id is a no-op duplicate."""
        return unwrap(self.run([Call("feedback", (decision_id, reward))])[0])

    def add_arm(self, name: str, prior: PriorKind = "pooled", prior_var: float | None = None) -> dict[str, Any]:
        """Add an operator. 'pooled' starts it at the average of the current arms' posteriors."""
        return unwrap(self.run([Call("add_arm", (name, prior, prior_var))])[0])

    def stats(self) -> dict[str, Any]:
        return unwrap(self.run([Call("stats")])[0])

    def run(self, calls: Sequence[Call]) -> list[Answer]:
        """Answer `calls` in order under the folder's lock, on the newest saved state (reloaded
        first if another process saved since this one last read or wrote it), with one save for
        all of them. A refused call (a SimMergeError, raised before it changes anything) gets its
        error as its answer and leaves no trace; the others stand. If the batch cannot be saved
        or a call fails unexpectedly (any exception, even an interrupt raised by a caller's own
        value), the saved state is reloaded and the calls are answered again with one save each,
        so that each gets its own answer or its own error. A batch holds at most `max_pending`
        decisions: more would expire its own before they are answered."""
        if sum(c.name == "decide" for c in calls) > self.settings["max_pending"]:
            raise ValueError(f"a batch of {len(calls)} calls holds more decisions than max_pending "
                             f"({self.settings['max_pending']}): the first would expire before they are answered")
        with folder_lock(self.state_dir):
            if self._seen is None or not self._seen.current():
                self._load()
            if len(calls) == 1:
                return [self._answer_saved(calls[0])]
            saves = self.saves
            try:
                answers = [self._apply(call) for call in calls]
                if any(c.name in MUTATIONS and not isinstance(a, Exception) for c, a in zip(calls, answers)):
                    self._persist()
                return answers
            except BaseException:  # noqa: BLE001 (each call is answered again below, its error kept)
                if self.saves != saves:  # raised after the batch was saved: a replay would apply it twice
                    raise
                self._load()  # nothing of this batch is saved: start again from what is
                return [self._answer_saved(call) for call in calls]

    def _apply(self, call: Call) -> Answer:
        """A call applied in memory, not saved: its answer, or its refusal (which changed nothing)."""
        handler = {"decide": self._decide, "feedback": self._feedback, "add_arm": self._add_arm,
                   "stats": self._stats, "describe": self._describe}[call.name]
        try:
            return handler(*call.args, **call.kwargs)
        except SimMergeError as e:
            return e

    def _answer_saved(self, call: Call) -> Answer:
        """A call applied and saved: its answer, or its error with the saved state in memory."""
        try:
            if self._seen is None or not self._seen.current():  # e.g. saved but not reopened
                self._load()
            answer = self._apply(call)
            if call.name in MUTATIONS and not isinstance(answer, Exception):
                self._persist()  # a refusal to save has already restored the saved state
            return answer
        except SimMergeError as e:
            return e
        except BaseException as e:  # noqa: BLE001 (a fault: drop whatever it changed in memory; raised by unwrap)
            self._load()
            return e

    def _decide(self, x: Sequence[float] | np.ndarray, arms: Sequence[str] | None = None, *,
                trusted: bool = False) -> dict[str, Any]:
        x = check_features(x, len(self.encoder.feature_names))
        if x.shape[0] != 1:
            raise FeatureError(f"features: one context per decision, got {x.shape[0]} rows")
        if isinstance(arms, str):  # a string is a sequence: "linear" was read as the arms 'l', 'i', ...
            raise BanditError(f"'arms' must be a list of arm names, got the string {arms!r}")
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
        outside = out_of_range(self.encoder, x)  # before any change: it may raise
        generator = self.bandit.rng.bit_generator.state
        with np.errstate(all="ignore"):
            arm, draws = self.bandit.choose(z, allowed)
            means = self.bandit.mean_scores(z)[0]
        if not (np.all(np.isfinite(draws)) and np.all(np.isfinite(means))):
            self.bandit.rng.bit_generator.state = generator  # a refused request leaves no trace
            raise FeatureError("features: this context gives non-finite scores (values far outside "
                               "the encoder's range); refused")
        names = self.bandit.arm_names
        seq = self.counters["decisions"]
        decision_id = uuid.uuid4().hex
        self.pending[decision_id] = Pending(names[arm], z, seq, trusted)
        same = [d for d, p in self.pending.items() if p.trusted == trusted]  # oldest first
        for d in same[: max(0, len(same) - self.settings["max_pending"])]:
            del self.pending[d]
            self.counters["expired"] += 1
        self.counters["decisions"] = seq + 1
        return {
            "decision_id": decision_id,
            "operator": names[arm],
            "scores": {n: float(s) for n, s in zip(names, draws)},
            "expected": {n: float(m) for n, m in zip(names, means)},
            "seq": seq,
            # undefined for this pair, so imputed with the offline mean: said, never silent
            "imputed": [n for n, m in zip(self.encoder.feature_names, missing) if m],
            # a context unlike the offline rows: the scores extrapolate, said, never silent
            "out_of_range": outside,
        }

    def _feedback(self, decision_id: str, reward: float) -> dict[str, Any]:
        reward = check_reward(reward)
        if decision_id in self.done:
            arm, first = self.done[decision_id]
            self.counters["duplicates"] += 1
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
        return {"decision_id": decision_id, "operator": decision.arm, "status": "counted", "reward": reward}

    def _add_arm(self, name: str, prior: PriorKind = "pooled", prior_var: float | None = None) -> dict[str, Any]:
        if not name or not name.strip():
            raise BanditError("arm name must be a non-empty string")
        if prior not in ("pooled", "zero"):
            raise BanditError(f"arm {name!r}: prior must be 'pooled' or 'zero', got {prior!r}")
        mean = self.bandit.pooled_prior_mean() if prior == "pooled" else None
        self.bandit.add_arm(name, prior_mean=mean, prior_var=check_prior_var(prior_var))
        return {"arm": name, "arms": self.bandit.arm_names}

    def _stats(self) -> dict[str, Any]:
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
            "pending_trusted": sum(p.trusted for p in self.pending.values()),
            "arms": arms,
            "noise_var": self.bandit.noise_var,
            "encoder": self.settings["encoder"]["kind"],
            "feature_names": list(self.encoder.feature_names),
            "encoded_width": self.encoder.width,
        }

    def _describe(self) -> dict[str, Any]:
        """What a front needs to know of the state it serves: settings, folder, feature names."""
        return {**self.settings, "state_dir": str(self.state_dir), "feature_names": list(self.encoder.feature_names)}

    # ----- persistence
    def _persist(self) -> None:
        """Save (the caller holds the folder's lock); a state that cannot be saved (non-finite, or
        the disk refuses) is undone in memory too, then refused. A file replaced since this
        process read it is never overwritten: under the lock that means the volume ignores locks."""
        if self._seen is None or not self._seen.current():
            raise CheckpointError(f"{self.state_dir / STATE_FILE}: replaced by another process while this one held "
                                  f"the folder's lock ({LOCK_FILE}): this volume does not honour POSIX locks; serve "
                                  "this folder from one process only")
        try:
            _write(self.state_dir, self.bandit, self.pending, self.done, self.counters)
            self.saves += 1
        except NonFiniteStateError:
            self._load()
            raise
        except OSError as e:
            self._load()
            raise CheckpointError(f"{self.state_dir / STATE_FILE}: not saved ({e.strerror or e}); "
                                  "the saved state is unchanged") from None
        self._seen.close()
        try:
            self._seen = SeenFile(self.state_dir / STATE_FILE)
        except CheckpointError:  # saved, but not reopened (e.g. out of descriptors): the next request reloads
            self._seen = None


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
    arrays["pending_trusted"] = np.array([p.trusted for p in pending.values()], dtype=bool)
    arrays["done_id"] = np.array(list(done), dtype="S32")
    arrays["done_arm"] = np.array([index[a] for a, _ in done.values()], dtype=np.int32)
    arrays["done_reward"] = np.array([r for _, r in done.values()], dtype=np.float64)
    write_state(state_dir, {"lints": lints_meta, "counters": counters}, arrays)
