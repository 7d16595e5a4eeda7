"""What each actor asks Ray for, set by flags or SIMMERGE_* environment variables.

Two roles of actors exist in the pipeline: *streaming* actors read, reduce and write weights
tensor by tensor (I/O and memory bound: merges, structural features, Gram matrices) and
*inference* actors run forward passes (probe inference, evaluation, training of the testbed),
which want an accelerator when the cluster has one. The same job runs on a laptop (defaults:
1 CPU, no GPU) and on a cluster with GPU workers (e.g. `--gpus-per-inference-actor 1`) because
the asks are read here, from the environment the job entry points export, and nowhere else.
Library code calls `streaming_ask()`, `inference_ask()`, `max_actors()` and `pool_size()`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from simmerge_ray.errors import ConfigError

STREAMING = "streaming"
INFERENCE = "inference"

# Flag (argparse dest) -> environment variable. Flags win over the environment.
ENV_VARS: dict[str, str] = {
    "cpus_per_actor": "SIMMERGE_CPUS_PER_ACTOR",
    "memory_per_actor": "SIMMERGE_MEMORY_PER_ACTOR",
    "cpus_per_inference_actor": "SIMMERGE_CPUS_PER_INFERENCE_ACTOR",
    "gpus_per_inference_actor": "SIMMERGE_GPUS_PER_INFERENCE_ACTOR",
    "memory_per_inference_actor": "SIMMERGE_MEMORY_PER_INFERENCE_ACTOR",
    "max_actors": "SIMMERGE_MAX_ACTORS",
}

# Which roles of actors each pipeline stage starts (what a cluster must be able to host).
STAGE_ROLES: dict[str, tuple[str, ...]] = {
    "zoo_build": (INFERENCE,),
    "probe": (INFERENCE,),
    "features": (STREAMING, INFERENCE),
    "label": (STREAMING, INFERENCE),
    "fit": (STREAMING,),
    "plan": (STREAMING,),
    "plan_batch": (STREAMING,),
    "merge": (STREAMING,),
    "serve": (STREAMING,),
    "pipeline": (STREAMING, INFERENCE),
    "transfer": (STREAMING, INFERENCE),
}

# Kubernetes quantity suffixes (K, k and the lowercase g/t/p of a command line are read as
# decimal too); a lowercase `m` is refused: Kubernetes reads `500m` as 0.5 (milli), not 500e6.
_BYTES = re.compile(r"^\s*([+-]?)([0-9]*\.?[0-9]+)\s*([KMGTP]i?|[kgtp]|m)?B?\s*$")
_UNIT = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def parse_bytes(text: str, *, what: str) -> int:
    """'8Gi' -> 8*2**30, '512M' -> 512e6, '1073741824' -> itself (Kubernetes quantity style); a
    size of at least one byte, else a ConfigError naming `what` (the option, variable or field)."""
    m = _BYTES.match(str(text))
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (examples: 8Gi, 512Mi, 2G, 1073741824)")
    sign, number, unit = m.group(1), m.group(2), m.group(3) or ""
    if unit == "m":
        raise ConfigError(f"{what}: {text!r} is {number} thousandths of a byte (in a Kubernetes quantity m is "
                          f"milli); write {number}M for {number}*10**6 bytes or {number}Mi for {number}*2**20")
    value = int(float(number) * _UNIT[unit[:1].upper() + unit[1:]])
    if sign == "-" or value <= 0:
        raise ConfigError(f"{what}: size must be positive (at least one byte), got {text!r}")
    return value


def _parse_float(text: str, *, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{what}: must be >= 0, got {text!r}")
    return value


@dataclass(frozen=True)
class ResourceAsk:
    """The Ray resources one actor reserves: logical CPUs, GPUs (a fraction shares one) and memory."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes; a scheduling reservation, not a cap

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"resource ask {self}: CPUs and GPUs must be >= 0")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ConfigError(f"resource ask {self}: a GPU ask above 1 must be a whole number "
                              f"(Ray shares only a single GPU fractionally), got {self.num_gpus}")
        if self.memory is not None and self.memory <= 0:
            raise ConfigError(f"resource ask {self}: memory must be positive")

    def ray_options(self) -> dict[str, float | int]:
        """Keyword arguments for `.options(...)`, `ray.remote(...)` or `map_batches(...)`."""
        opts: dict[str, float | int] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        return opts


@dataclass(frozen=True)
class StageResources:
    """Both roles' asks plus the cap on actors per pool (None: the stage picks its own)."""

    streaming: ResourceAsk
    inference: ResourceAsk
    max_actors: int | None = None

    def for_role(self, role: str) -> ResourceAsk:
        return {STREAMING: self.streaming, INFERENCE: self.inference}[role]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StageResources:
        return _build(_raw_from_env(os.environ if env is None else env))


def _raw_from_env(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """key -> (text, where it came from), for the variables that are set and non-empty."""
    return {key: (env[var], var) for key, var in ENV_VARS.items() if env.get(var) not in (None, "")}


def _build(raw: Mapping[str, tuple[str, str]]) -> StageResources:
    """Parse and validate; every error names the flag or variable the bad value came from."""

    def num(key: str, default: float) -> float:
        return _parse_float(raw[key][0], what=raw[key][1]) if key in raw else default

    def size(key: str) -> int | None:
        return parse_bytes(raw[key][0], what=raw[key][1]) if key in raw else None

    cap = None
    if "max_actors" in raw:
        text, where = raw["max_actors"]
        if not text.strip().isdigit() or int(text) < 1:
            raise ConfigError(f"{where}: must be a whole number >= 1, got {text!r}")
        cap = int(text)
    try:
        return StageResources(
            streaming=ResourceAsk(num("cpus_per_actor", 1.0), 0.0, size("memory_per_actor")),
            inference=ResourceAsk(num("cpus_per_inference_actor", 1.0), num("gpus_per_inference_actor", 0.0),
                                  size("memory_per_inference_actor")),
            max_actors=cap,
        )
    except ConfigError as e:
        sources = ", ".join(where for _, where in raw.values())
        raise ConfigError(f"{e} (from {sources or 'defaults'})") from None


def add_resource_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every job entry point; each defaults to its SIMMERGE_* variable."""
    g = parser.add_argument_group("resources (each flag overrides its SIMMERGE_* environment variable)")
    g.add_argument("--cpus-per-actor", help=f"CPUs per streaming actor [{ENV_VARS['cpus_per_actor']}, default 1]")
    g.add_argument("--memory-per-actor", help=f"memory reserved per streaming actor, e.g. 8Gi "
                                              f"[{ENV_VARS['memory_per_actor']}]")
    g.add_argument("--cpus-per-inference-actor",
                   help=f"CPUs per inference actor [{ENV_VARS['cpus_per_inference_actor']}, default 1]")
    g.add_argument("--gpus-per-inference-actor",
                   help=f"GPUs per inference actor, a fraction shares one GPU "
                        f"[{ENV_VARS['gpus_per_inference_actor']}, default 0 = CPU]")
    g.add_argument("--memory-per-inference-actor",
                   help=f"memory reserved per inference actor [{ENV_VARS['memory_per_inference_actor']}]")
    g.add_argument("--max-actors", help=f"actors per pool (batch planning's pool scales up to it with the backlog; "
                                        f"the structural, label and merge pools start that many, or as many as "
                                        f"the cluster can ever hold at once) [{ENV_VARS['max_actors']}]")


def resources_from_flags(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> StageResources:
    """The flags given in `args` over the variables in `env` (default os.environ), validated."""
    raw = _raw_from_env(os.environ if env is None else env)
    for key in ENV_VARS:
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = (str(value), "--" + key.replace("_", "-"))
    return _build(raw)


def export(resources: StageResources, env: MutableMapping[str, str] | None = None) -> None:
    """Write the asks into `env` (default os.environ) so library code in this process reads them."""
    env = os.environ if env is None else env
    values = {
        "cpus_per_actor": resources.streaming.num_cpus,
        "memory_per_actor": resources.streaming.memory,
        "cpus_per_inference_actor": resources.inference.num_cpus,
        "gpus_per_inference_actor": resources.inference.num_gpus,
        "memory_per_inference_actor": resources.inference.memory,
        "max_actors": resources.max_actors,
    }
    for key, value in values.items():
        if value is None:
            env.pop(ENV_VARS[key], None)
        else:
            env[ENV_VARS[key]] = str(value)


def streaming_ask() -> ResourceAsk:
    return StageResources.from_env().streaming


def inference_ask() -> ResourceAsk:
    return StageResources.from_env().inference


@dataclass(frozen=True)
class SizeFrom:
    """What set an actor pool's size, named in its messages. A size that can never be placed at
    once is refused when it is `firm` (a command's own `--workers N`: the user asked for exactly
    that many) and cut to what the cluster holds when it is a cap (SIMMERGE_MAX_ACTORS, a job's
    `--max-actors`: "at most"), as a stage's default is."""

    name: str
    firm: bool = True


def max_actors(default: int) -> int:
    """The pool size to use: SIMMERGE_MAX_ACTORS when set, else the stage's own default."""
    return StageResources.from_env().max_actors or default


def pool_size(given: int | None, default: int, flag: str = "--workers") -> tuple[int, SizeFrom | None]:
    """An actor pool's size and what set it: the command's own `flag` when `given` (firm), else
    SIMMERGE_MAX_ACTORS (a cap), else the stage's `default` (None)."""
    if given:
        return given, SizeFrom(f"{flag} {given}")
    n = StageResources.from_env().max_actors
    return (default, None) if n is None else (n, SizeFrom(f"{ENV_VARS['max_actors']}={n}", firm=False))
