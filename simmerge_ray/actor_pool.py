"""The one pool of Ray actors that the streaming stages share (Gram pass, merge, labels).

Each stage has per-actor state worth keeping (open checkpoints, a loaded catalog, buffers), so
it runs a fixed set of actors rather than tasks, and feeds them work as they free up: the next
item goes to whichever actor finished first, so a slow item never holds the others back. The
resource ask is passed in by the caller (from the command's flags or the job's manifest),
checked against the cluster's node types before anything starts, and the actors are killed
when the pool closes, also on an error.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import ray

from simmerge_ray import placement
from simmerge_ray.errors import ray_get
from simmerge_ray.resources import ResourceAsk, SizeFrom

T = TypeVar("T")
log = logging.getLogger(__name__)


class ActorPool(Generic[T]):
    """`size` actors of `actor_cls`, each built with `args`, asking `ask` (plus custom `resources`).
    Every actor is handed work at once (and callers wait for all to start), so a pool larger than
    the cluster can ever hold would wait forever for its last actors: a firm size (`size_from`, a
    command's `--workers N`) is refused in one line naming it; a cap (SIMMERGE_MAX_ACTORS) or a
    stage's default (`size_from` None) is cut to what the cluster holds, with a warning.

    With `max_retries` > 0 a lost actor is restarted and its calls retried, so a worker or node
    lost mid-run costs only the calls it held (the methods must be safe to repeat). Ray retries
    most such calls itself; one in flight when the node went may instead come back as
    `ActorUnavailableError` ("may or may not have been executed"), and the pool resubmits it."""

    def __init__(self, actor_cls: type, size: int, ask: ResourceAsk, *, what: str, args: Sequence[Any] = (),
                 resources: Mapping[str, float] | None = None, max_retries: int = 0,
                 size_from: SizeFrom | None = None) -> None:
        wanted = max(1, size)
        group = f"the {what} pool ({size_from.name})" if size_from is not None and size_from.firm else None
        size = placement.placed_count(wanted, ask, dict(resources) if resources else None, each=what, group=group)
        if size < wanted:
            log.warning("%s pool: %d actors, the most this cluster can hold at once (%s asked for %d)",
                        what, size, size_from.name if size_from else "the default", wanted)
        options: dict[str, Any] = {**ask.ray_options(), "max_restarts": max_retries, "max_task_retries": max_retries}
        if resources:
            options["resources"] = dict(resources)
        remote_cls = ray.remote(actor_cls).options(**options)
        self.actors = [remote_cls.remote(*args) for _ in range(size)]
        self.max_retries = max_retries

    def wait_ready(self) -> None:
        """Block until every actor has started (so start-up is not counted as work)."""
        ray_get([a.__ray_ready__.remote() for a in self.actors])

    def map_unordered(self, method: str, items: Sequence[T], *, in_flight: int = 1,
                      args: Sequence[Any] = ()) -> Iterator[tuple[int, Any]]:
        """(k, `actor.method(items[k], *args)`) as each call finishes, items handed out in order;
        callers place results by position k (an item need not be hashable or unique).

        `in_flight` calls per actor keep it busy across the driver's round trip; a failed call
        raises at once (a SimMergeError as its own one-line message), but for one lost with its
        node, which is resubmitted (see the class)."""
        todo = deque(range(len(items)))
        pending: dict[Any, tuple[Any, int, int]] = {}  # ref -> (actor, position, resubmissions so far)

        def submit(actor: Any, k: int, tries: int = 0) -> None:
            pending[getattr(actor, method).remote(items[k], *args)] = (actor, k, tries)

        for _ in range(in_flight):
            for actor in self.actors:
                if todo:
                    submit(actor, todo.popleft())
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            actor, k, tries = pending.pop(ready)
            try:
                result = ray_get(ready)
            except ray.exceptions.ActorUnavailableError:
                if tries >= self.max_retries:
                    raise
                log.warning("a %s call was lost with its actor's node; resubmitted (%d of %d)", method,
                            tries + 1, self.max_retries)
                submit(actor, k, tries + 1)  # queued by Ray until the actor is back
                continue
            if todo:
                submit(actor, todo.popleft())
            yield k, result

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)

    def __enter__(self) -> ActorPool[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
