"""The bandit as a named, restartable Ray actor.

The actor is a thin shell around `BanditCore`: its constructor loads the state folder, so when
Ray restarts it after a crash or `ray.kill(..., no_restart=False)` it resumes from the last
persisted update, pending decisions included. It is an async actor that queues the calls it
receives and hands them to the core in batches, one batch at a time on a worker thread: while a
batch's state is being written, the calls that arrive queue up and become the next batch, which
is saved with one write (group commit). Each call is answered only once its batch is saved.
Calls that were in flight when the actor died are retried on the restarted actor; feedback is
idempotent, so a retry is never learned twice.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import ray

from simmerge_ray.errors import ConfigError, SimMergeError, ray_get
from simmerge_ray.bandit.calls import Answer, Call
from simmerge_ray.bandit.core import BanditCore, PriorKind

ACTOR_NAME = "simmerge-bandit"
NAMESPACE = "simmerge"
MAX_BATCH = 256  # calls answered by one save; bounds the wait of a call that arrives behind a flood


class BanditActor:
    def __init__(self, state_dir: str):
        # A bad state folder is raised by every call (which tries to load it again), not by the
        # constructor: Ray hands a constructor's error back only inside a multi-line actor-death
        # message, a method's as itself (`ray_get`), so the caller can print the one line that
        # names the file.
        self._state_dir = Path(state_dir)
        self._core: BanditCore | None = None
        self._queue: list[tuple[Call, asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference
        try:
            self._core = BanditCore(self._state_dir)
        except SimMergeError:
            pass  # raised again by the first call

    def _answer(self, calls: list[Call]) -> list[Answer]:
        """A batch's answers (on the worker thread). The state is loaded again for each batch
        until it loads: a folder repaired after a restart serves again without another restart."""
        if self._core is None:
            self._core = BanditCore(self._state_dir)
        return self._core.run(calls)

    async def _call(self, call: Call) -> dict[str, Any]:
        """Queue `call`, start draining if no batch is under way, and wait for its answer."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        if self._drainer is None or self._drainer.done():  # it ends, done, in the step that saw the queue empty
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        answer = await future
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, BaseException):  # an interrupt raised out of a coroutine would stop the actor's loop
            raise RuntimeError(f"{call.name}: {type(answer).__name__} raised by the call: {answer}")
        return answer

    def _batch_size(self) -> int:
        """Calls per batch: at most the ledger's `max_pending` (a batch's decisions must not expire
        each other before they are answered); one until the state has loaded and says it."""
        return 1 if self._core is None else min(MAX_BATCH, self._core.settings["max_pending"])

    async def _drain(self) -> None:
        while self._queue:
            self._queue = [(call, future) for call, future in self._queue if not future.done()]  # cancelled
            size = self._batch_size()
            batch, self._queue = self._queue[:size], self._queue[size:]
            if not batch:
                break
            try:
                answers = await asyncio.to_thread(self._answer, [call for call, _ in batch])
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 (the state did not load: every call is told why)
                answers = [_own_copy(e) for _ in batch]
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():  # its caller may have been cancelled
                    future.set_result(answer)

    async def decide(self, x: list[float], arms: list[str] | None = None, trusted: bool = False) -> dict[str, Any]:
        return await self._call(Call("decide", (x, arms), {"trusted": trusted}))

    async def feedback(self, decision_id: str, reward: float) -> dict[str, Any]:
        return await self._call(Call("feedback", (decision_id, reward)))

    async def add_arm(self, name: str, prior: PriorKind = "pooled", prior_var: float | None = None) -> dict[str, Any]:
        return await self._call(Call("add_arm", (name, prior, prior_var)))

    async def stats(self) -> dict[str, Any]:
        return await self._call(Call("stats"))

    async def describe(self) -> dict[str, Any]:
        """The state's settings, its folder (`state_dir`) and the raw feature names."""
        return await self._call(Call("describe"))


def _own_copy(error: BaseException) -> BaseException:
    """The error for one of the calls it answers: raised once per caller, one shared object would
    collect every caller's traceback (1 MB of error text for a batch of 256)."""
    try:
        return copy.copy(error)
    except Exception:  # noqa: BLE001 (an exception that cannot be copied is shared)
        return error


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
        describe = handle.describe
    except AttributeError:  # a detached actor of an older simmerge, started before `describe` existed
        raise ConfigError(f"actor {namespace}/{name} is running an older simmerge; stop it (ray.kill) and start "
                          "the service again") from None
    try:
        running = ray_get(describe.remote())["state_dir"]
    except SimMergeError:  # a bad state folder: this actor can serve nothing
        ray.kill(handle, no_restart=True)
        raise
    if running != str(Path(state_dir).resolve()):
        raise ConfigError(f"actor {namespace}/{name} already serves {running}, not {state_dir}")
    return handle
