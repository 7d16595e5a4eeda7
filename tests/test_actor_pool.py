"""The one actor pool (simmerge_ray/actor_pool.py) on the session's real Ray: every item once,
paired with its own result, on every actor; errors as one line; actors gone after the pool."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
import ray.cloudpickle

from simmerge_ray.actor_pool import ActorPool
from simmerge_ray.errors import ConfigError
from simmerge_ray.placement import UnsatisfiableAsk
from simmerge_ray.resources import ResourceAsk, SizeFrom

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/


class Squarer:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def run(self, x: int, scale: int) -> tuple[int, int]:
        if x < 0:
            raise ConfigError(f"item {x}: negative")
        time.sleep(1.0 if x == 100 else 0.0)  # one slow item: the other actor takes the rest meanwhile
        return x * x * scale + self.offset, os.getpid()


def test_every_item_once_with_its_result_on_every_actor(ray_cluster) -> None:
    with ActorPool(Squarer, 2, ResourceAsk(0.5), what="test actor", args=(1,)) as pool:
        pool.wait_ready()
        items = list(range(100, 120))
        got = [(items[k], r) for k, r in pool.map_unordered("run", items, in_flight=2, args=(10,))]
        actors = pool.actors
    assert sorted(x for x, _ in got) == items
    assert all(value == x * x * 10 + 1 for x, (value, _) in got)
    assert len({pid for _, (_, pid) in got}) == 2  # both actors took work
    order = [x for x, _ in got]
    assert order[0] != 100 and order != sorted(order)  # the slow item held back nothing handed out after it
    assert all(_dies_soon(a) for a in actors)  # killed when the pool closed


def _dies_soon(actor, seconds: float = 30.0) -> bool:
    """The actor stops answering within `seconds` (a kill lands asynchronously: a call made just
    after it may still be served)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_a_failed_call_raises_its_own_one_line_error(ray_cluster) -> None:
    with ActorPool(Squarer, 1, ResourceAsk(0.5), what="test actor", args=(0,)) as pool:
        with pytest.raises(ConfigError, match=r"^item -1: negative$"):
            list(pool.map_unordered("run", [1, -1, 2], args=(1,)))


def test_an_ask_no_node_offers_fails_before_any_actor_starts(ray_cluster) -> None:
    with pytest.raises(UnsatisfiableAsk, match=r"^test actor asks for CPU=64"):
        ActorPool(Squarer, 1, ResourceAsk(64.0), what="test actor")


def test_a_default_size_is_cut_to_what_the_cluster_holds(ray_cluster, caplog: pytest.LogCaptureFixture) -> None:
    """A memory ask that one actor of the fixed cluster can hold: a size a flag set is refused; the
    same size as a default (no size_from) starts one actor, with a warning, and does the work
    (the structural pool's one actor per free CPU waited forever for the other three)."""
    ask = ResourceAsk(1, 0, int(ray_cluster.cluster_resources()["memory"] * 0.6))
    with pytest.raises(UnsatisfiableAsk, match=r"^the test actor pool \(--workers 3\): 3 workers of CPU=1, memory=.* "
                                               r"each must run at once, but this cluster holds at most 1 "):
        ActorPool(Squarer, 3, ask, what="test actor", size_from=SizeFrom("--workers 3"))
    caplog.set_level(logging.WARNING, logger="simmerge_ray.actor_pool")
    with ActorPool(Squarer, 3, ask, what="test actor", args=(0,)) as pool:
        assert len(pool.actors) == 1
        assert sorted(r[0] for _, r in pool.map_unordered("run", [1, 2, 3], args=(1,))) == [1, 4, 9]
    assert [r.getMessage() for r in caplog.records if r.name == "simmerge_ray.actor_pool"] == [
        "test actor pool: 1 actors, the most this cluster can hold at once (the default asked for 3)"]
