"""Resource asks: flags over SIMMERGE_* variables over defaults, validated with the culprit named."""

from __future__ import annotations

import argparse

import pytest

from simmerge_ray import resources
from simmerge_ray.errors import ConfigError
from simmerge_ray.resources import ResourceAsk, StageResources


def _flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    resources.add_resource_flags(parser)
    return parser.parse_args(argv)


def test_defaults_run_on_a_laptop() -> None:
    r = StageResources.from_env({})
    assert r.streaming == ResourceAsk(1.0, 0.0, None)
    assert r.inference == ResourceAsk(1.0, 0.0, None)
    assert r.max_actors is None
    assert r.streaming.ray_options() == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_environment_sets_the_asks() -> None:
    r = StageResources.from_env({
        "SIMMERGE_CPUS_PER_ACTOR": "2", "SIMMERGE_MEMORY_PER_ACTOR": "6Gi",
        "SIMMERGE_GPUS_PER_INFERENCE_ACTOR": "0.5", "SIMMERGE_CPUS_PER_INFERENCE_ACTOR": "4",
        "SIMMERGE_MEMORY_PER_INFERENCE_ACTOR": "512M", "SIMMERGE_MAX_ACTORS": "8",
    })
    assert r.streaming.ray_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 6 * 2**30}
    assert r.inference.ray_options() == {"num_cpus": 4.0, "num_gpus": 0.5, "memory": 512 * 10**6}
    assert r.max_actors == 8
    assert r.for_role("inference") is r.inference


def test_flags_override_environment() -> None:
    env = {"SIMMERGE_CPUS_PER_ACTOR": "2", "SIMMERGE_GPUS_PER_INFERENCE_ACTOR": "1"}
    r = resources.resources_from_flags(_flags(["--cpus-per-actor", "3", "--max-actors", "5"]), env)
    assert r.streaming.num_cpus == 3.0  # flag
    assert r.inference.num_gpus == 1.0  # environment
    assert r.max_actors == 5


def test_export_round_trips_through_the_environment() -> None:
    r = resources.resources_from_flags(_flags(["--gpus-per-inference-actor", "0.25", "--memory-per-actor", "1Gi"]), {})
    env: dict[str, str] = {"SIMMERGE_MAX_ACTORS": "9"}
    resources.export(r, env)
    assert "SIMMERGE_MAX_ACTORS" not in env  # unset asks do not linger
    assert StageResources.from_env(env) == r


@pytest.mark.parametrize("text, expected", [("8Gi", 8 * 2**30), ("512Mi", 512 * 2**20), ("2G", 2 * 10**9),
                                            ("1.5GiB", int(1.5 * 2**30)), ("1048576", 1048576), ("4k", 4000)])
def test_parse_bytes(text: str, expected: int) -> None:
    assert resources.parse_bytes(text, what="x") == expected


@pytest.mark.parametrize("argv, culprit", [
    (["--memory-per-actor", "lots"], "--memory-per-actor"),
    (["--cpus-per-actor", "-1"], "--cpus-per-actor"),
    (["--gpus-per-inference-actor", "1.5"], "--gpus-per-inference-actor"),
    (["--max-actors", "0"], "--max-actors"),
])
def test_bad_flags_name_the_flag(argv: list[str], culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit):
        resources.resources_from_flags(_flags(argv), {})


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SIMMERGE_GPUS_PER_INFERENCE_ACTOR"):
        StageResources.from_env({"SIMMERGE_GPUS_PER_INFERENCE_ACTOR": "one"})


def test_max_actors_falls_back_to_the_stage_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIMMERGE_MAX_ACTORS", raising=False)
    assert resources.max_actors(3) == 3
    monkeypatch.setenv("SIMMERGE_MAX_ACTORS", "7")
    assert resources.max_actors(3) == 7


def test_asks_are_usable_as_ray_options(ray_cluster) -> None:
    """The dict goes straight into Ray: a 0.5-CPU actor with a memory reservation schedules and runs."""
    ask = ResourceAsk(num_cpus=0.5, num_gpus=0.0, memory=64 * 2**20)

    @ray_cluster.remote
    class Probe:
        def cpus(self) -> float:
            return ray_cluster.get_runtime_context().get_assigned_resources().get("CPU", 0.0)

    actor = Probe.options(**ask.ray_options()).remote()
    assert ray_cluster.get(actor.cpus.remote()) == 0.5
    ray_cluster.kill(actor)


def test_a_pool_size_says_what_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command's own flag is firm (refused if it can never be placed); SIMMERGE_MAX_ACTORS is a
    cap and the stage's default is None (both cut to what the cluster holds)."""
    monkeypatch.delenv("SIMMERGE_MAX_ACTORS", raising=False)
    assert resources.pool_size(None, 2) == (2, None)
    assert resources.pool_size(5, 2) == (5, resources.SizeFrom("--workers 5"))
    monkeypatch.setenv("SIMMERGE_MAX_ACTORS", "7")
    assert resources.pool_size(None, 2) == (7, resources.SizeFrom("SIMMERGE_MAX_ACTORS=7", firm=False))
    assert resources.pool_size(3, 2, "--merge-workers") == (3, resources.SizeFrom("--merge-workers 3"))
