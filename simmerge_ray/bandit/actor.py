"""The bandit as a named, restartable Ray actor.

The actor is a thin shell around `BanditCore`: its constructor loads the state folder, so when
Ray restarts it after a crash or `ray.kill(..., no_restart=False)` it resumes from the last
persisted update, pending decisions included. Calls are served one at a time (the state file is
rewritten by each), and calls that were in flight when the actor died are retried on the
restarted actor; feedback is idempotent, so a retry is never learned twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from simmerge_ray.errors import ConfigError, SimMergeError, ray_get
from simmerge_ray.bandit.core import BanditCore, PriorKind

ACTOR_NAME = "simmerge-bandit"
NAMESPACE = "simmerge"


class BanditActor:
    def __init__(self, state_dir: str):
        # A bad state folder is raised by every call (which tries to load it again), not by the
        # constructor: Ray hands a constructor's error back only inside a multi-line actor-death
        # message, a method's as itself (`ray_get`), so the caller can print the one line that
        # names the file.
        self._state_dir = Path(state_dir)
        self._core: BanditCore | None = None
        try:
            self._core = BanditCore(self._state_dir)
        except SimMergeError:
            pass  # raised again by the first call

    @property
    def core(self) -> BanditCore:
        """The loaded state; loaded again on each call until it loads (a folder repaired after a
        restart serves again without another restart)."""
        if self._core is None:
            self._core = BanditCore(self._state_dir)
        return self._core

    def decide(self, x: list[float], arms: list[str] | None = None, trusted: bool = False) -> dict[str, Any]:
        return self.core.decide(x, arms, trusted=trusted)

    def feedback(self, decision_id: str, reward: float) -> dict[str, Any]:
        return self.core.feedback(decision_id, reward)

    def add_arm(self, name: str, prior: PriorKind = "pooled", prior_var: float | None = None) -> dict[str, Any]:
        return self.core.add_arm(name, prior, prior_var)

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def settings(self) -> dict[str, Any]:
        return {**self.core.settings, "state_dir": str(self.core.state_dir)}

    def feature_names(self) -> list[str]:
        return list(self.core.encoder.feature_names)


def start_bandit_actor(
    state_dir: Path,
    *,
    name: str = ACTOR_NAME,
    namespace: str = NAMESPACE,
    max_restarts: int = -1,
    detached: bool = False,
) -> ray.actor.ActorHandle:
    """Create the named actor over `state_dir`, or return the running one of that name.

    The actor reserves no CPU: it is I/O-light and must not starve the cluster's other work.
    `detached`: it outlives its creator (a Serve replica started from a config, which may be
    replaced) and is placed on the creator's node where it can be (an actor that asks for
    nothing may otherwise land on the head, which a cluster keeps for its control plane);
    otherwise it belongs to the calling driver.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_cls = ray.remote(BanditActor)
    handle = remote_cls.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        max_restarts=max_restarts,
        max_task_retries=-1,
        num_cpus=0,
        lifetime="detached" if detached else None,
        scheduling_strategy=(NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
                             if detached else None),
    ).remote(str(Path(state_dir).resolve()))
    # Surfaces a bad state folder now, not at the first request, and refuses to silently hand
    # back a running actor of the same name that serves another folder.
    try:
        running = ray_get(handle.settings.remote())["state_dir"]
    except SimMergeError:  # a bad state folder: this actor can serve nothing
        ray.kill(handle, no_restart=True)
        raise
    if running != str(Path(state_dir).resolve()):
        raise ConfigError(f"actor {namespace}/{name} already serves {running}, not {state_dir}")
    return handle
