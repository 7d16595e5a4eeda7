"""The stages a Ray job runs (jobs/<stage>.py): each one's `simmerge` commands, the job's own
flags, and the command line each step gets. jobs/_entry.py runs them; the KubeRay manifest check
(simmerge_ray/job_entrypoint.py) reads an entrypoint's flags with the same parser and command lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from simmerge_ray import resources
from simmerge_ray.arg_parser import Parser
from simmerge_ray.errors import ConfigError


@dataclass(frozen=True)
class Step:
    """One `simmerge` command that a job runs."""

    command: tuple[str, ...]  # the subcommand words, e.g. ("features", "structural")
    module: str  # simmerge_ray/cli/<module>.py defines it
    config: str | None = "--config"  # "positional", the flag that takes the config file, or None
    out: bool = True  # the command takes --out
    overwrite: bool = True  # the command takes --overwrite (replace the output)
    extras: bool = True  # flags the job does not know are passed to this command
    # Command flags derived from the resource asks, for commands that take them as flags.
    resource_flags: Callable[[resources.StageResources], list[str]] = field(default=lambda r: [])


@dataclass(frozen=True)
class Stage:
    """A job's steps, run in order into the same output folder."""

    steps: tuple[Step, ...]

    @property
    def commands(self) -> str:
        return " + ".join("simmerge " + " ".join(step.command) for step in self.steps)


def _merge_flags(r: resources.StageResources) -> list[str]:
    return ["--cpus-per-worker", str(r.streaming.num_cpus)]


STAGES: dict[str, Stage] = {
    "zoo_build": Stage((Step(("zoo", "build"), "zoo"),)),
    "probe": Stage((Step(("probe",), "probe", config="--catalog"),)),
    # Structural features first (it creates the folder), then the functional ones, which join the
    # two into features.parquet; flags the job does not know go to the functional step.
    "features": Stage((Step(("features", "structural"), "features", config="--catalog", extras=False),
                       Step(("features", "functional"), "features", config="--catalog", overwrite=False))),
    # Resumes from its cache. Like every pool, its evaluator actors are capped by --max-actors, which
    # reaches the command as SIMMERGE_MAX_ACTORS (a cap, cut to what the cluster holds; a command's
    # own --workers N is a firm count, refused when the cluster can never hold it).
    "label": Stage((Step(("label",), "zoo", config="--catalog", overwrite=False),)),
    # fit and plan take their inputs as flags (--features, --labels, --selector, ...), passed through.
    "fit": Stage((Step(("fit",), "selector", config=None),)),
    "plan": Stage((Step(("plan",), "plan", config=None, overwrite=False),)),
    # --config is the request table; the pool size comes from --max-actors (SIMMERGE_MAX_ACTORS).
    "plan_batch": Stage((Step(("plan-batch",), "plan_batch", config="--requests", overwrite=False),)),
    "merge": Stage((Step(("merge",), "merge", config="positional", resource_flags=_merge_flags),)),
    # A long-running job: the bandit's HTTP server on the cluster; --config is its state folder.
    "serve": Stage((Step(("serve",), "serve", config="--state", out=False, overwrite=False),)),
    # --config is the zoo config; every stage runs into --out, finished stages are reused.
    "pipeline": Stage((Step(("pipeline",), "demo", overwrite=False),)),
    # --config is the target zoo's config; --selector (the source zoo's selector) passes through.
    "transfer": Stage((Step(("transfer",), "transfer", overwrite=False),)),
}


def build_parser(stage: str) -> argparse.ArgumentParser:
    spec = STAGES[stage]
    parser = Parser(
        prog=f"jobs/{stage}.py", allow_abbrev=False,
        description=f"Ray job: `{spec.commands}`. Unknown flags go to the command as they are.")
    parser.add_argument("--config", help="the stage's config file (path or URI)")
    parser.add_argument("--out", help="output folder: a path, or a URI (s3://, gs://, file://...) "
                                      "that the finished output is uploaded to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--staging-dir", default=None,
                        help="folder where an output bound for a URI is written before its upload, kept "
                             "after a failure so that the same command resumes; on a cluster it must be on "
                             "storage every node mounts (default: the system temp dir, one node only)")
    resources.add_resource_flags(parser)
    return parser


def job_args(stage: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Check the job's own flags as the job does before any step runs (a ConfigError; the KubeRay
    manifest check asks the same) and return the flags it passes on to its commands (a leading
    `--` dropped)."""
    steps = STAGES[stage].steps
    if args.config and all(step.config is None for step in steps):
        raise ConfigError(f"--config: `{STAGES[stage].commands}` takes no config file; give its inputs "
                          f"as its own flags (see `simmerge {' '.join(steps[0].command)} --help`)")
    return extra[1:] if extra[:1] == ["--"] else extra


def command_argv(step: Step, args: argparse.Namespace, extra: list[str], out: str | None,
                 asks: resources.StageResources, config: str | None) -> list[str]:
    """The `simmerge` argument list of one step; flags the user passed win over derived ones."""
    argv = list(step.command)
    if config is not None and step.config is not None:
        argv += [config] if step.config == "positional" else [step.config, config]
    if out is not None and step.out:
        argv += ["--out", out]
    if args.overwrite and step.overwrite:
        argv.append("--overwrite")
    extra = extra if step.extras else []
    derived = step.resource_flags(asks)
    given = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    for flag, value in zip(derived[::2], derived[1::2]):
        if flag not in given:
            argv += [flag, value]
    return argv + extra
