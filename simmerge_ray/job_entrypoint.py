"""A RayJob's entrypoint read as the job reads it: every `python jobs/<stage>.py ...` it runs
(shell words, `VAR=value` prefixes), the job's own flags and the command lines its steps would
get, each checked by the parser that will read it, and the resource ask of each actor role it
starts. The KubeRay manifest check (simmerge_ray/kuberay.py) places those asks on the manifest's
worker groups. The one library module that reads the commands' parsers (simmerge_ray.cli:
tests/test_house_rules.py CLI_READERS); jobs/_entry.py asks it only whether an unknown flag is a
misspelt job flag (check_misspelt_job_flags)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re

from simmerge_ray import job_stages, resources
from simmerge_ray.arg_parser import closest_option
from simmerge_ray.errors import ConfigError
from simmerge_ray.shell_commands import shell_commands

_JOB_SCRIPT = re.compile(r"(?:^|/)jobs/(\w+)\.py$")


def entrypoint_jobs(entrypoint: str, env_vars: dict[str, str] | None = None
                    ) -> list[tuple[str, dict[str, resources.ResourceAsk]]]:
    """Every jobs/<stage>.py an entrypoint runs, with the ask of each actor role it starts (its flags
    over the command's `VAR=value` prefix over `env_vars`, the runtime env's)."""
    jobs = []
    for words, env in shell_commands(entrypoint, dict(env_vars or {})):
        found = [(i, m.group(1)) for i, w in enumerate(words) if (m := _JOB_SCRIPT.search(w))]
        if not found:
            continue
        index, stage = found[0]
        if stage not in resources.STAGE_ROLES:
            raise ConfigError(f"entrypoint {entrypoint!r}: jobs/{stage}.py is not a job script "
                              f"(stages: {', '.join(resources.STAGE_ROLES)})")
        args, extra = _parsed(job_stages.build_parser(stage), words[index + 1:], entrypoint)
        try:
            extra = job_stages.job_args(stage, args, extra)
        except ConfigError as e:
            raise ConfigError(f"entrypoint {entrypoint!r}: jobs/{stage}.py would refuse it: {e}") from None
        asks = resources.resources_from_flags(args, env)
        try:
            check_misspelt_job_flags(stage, extra)
        except ConfigError as e:
            raise ConfigError(f"entrypoint {entrypoint!r}: {e}") from None
        check_command_flags(stage, args, extra, asks, entrypoint)
        jobs.append((stage, {role: asks.for_role(role) for role in resources.STAGE_ROLES[stage]}))
    if not jobs:
        raise ConfigError(f"entrypoint {entrypoint!r} does not run a jobs/<stage>.py script "
                          f"(stages: {', '.join(resources.STAGE_ROLES)})")
    return jobs


def check_command_flags(stage: str, args: argparse.Namespace, extra: list[str], asks: resources.StageResources,
                        entrypoint: str) -> None:
    """The command line each step of the job would run (the flags the job does not know go to the
    command), read by the command's own parser: a misspelt flag (`--num-cpu`), a value it refuses
    is a ConfigError naming it, not a job that fails on the cluster (options left out are not
    checked here). The one place outside simmerge_ray/cli that reads its parsers (test_house_rules)."""
    from simmerge_ray.cli import build_parser, leaf_parsers

    for step in job_stages.STAGES[stage].steps:
        argv = job_stages.command_argv(step, args, extra, args.out, asks, args.config)
        parser = build_parser((step.module,))
        for _, leaf in leaf_parsers(parser):
            for item in (*leaf._actions, *leaf._mutually_exclusive_groups):
                item.required = False
        _parsed(parser, argv, entrypoint, f"jobs/{stage}.py runs `simmerge {' '.join(step.command)}` with the "
                f"flags it does not know, and it would refuse them: ")


def _command_parser(step: job_stages.Step) -> argparse.ArgumentParser:
    """The parser of a step's command (`simmerge features structural`'s, not `simmerge features`')."""
    from simmerge_ray.cli import build_parser, leaf_parsers

    return dict(leaf_parsers(build_parser((step.module,))))[(step.command[0], *step.command[1:])]


def check_misspelt_job_flags(stage: str, extra: list[str]) -> None:
    """A flag the job does not know goes to its commands; one that no command of the job takes
    but that is close to a job flag (`--cpus-per-actr`, `--max-actor`) is a misspelt job flag: a
    ConfigError naming it, before any step runs, rather than a command refusing it after the job
    started. jobs/_entry.py asks it too (the one reader of the commands' parsers)."""
    flags = [word.split("=", 1)[0] for word in extra if word.startswith("--") and word != "--"]
    steps = [step for step in job_stages.STAGES[stage].steps if step.extras]
    if not flags or not steps:
        return
    job_parser = job_stages.build_parser(stage)
    command_options = {o for step in steps for a in _command_parser(step)._actions for o in a.option_strings}
    for flag in flags:
        if flag in command_options or any(o.startswith(flag) for o in command_options):  # taken, or an abbreviation
            continue
        close = closest_option(flag, job_parser, cutoff=0.85)
        if close:
            raise ConfigError(f"{flag}: no option of `{job_stages.Stage(tuple(steps)).commands}` and not a flag of "
                              f"jobs/{stage}.py; did you mean the job flag {close}?")


def _parsed(parser: argparse.ArgumentParser, argv: list[str], entrypoint: str, runs: str = ""
            ) -> tuple[argparse.Namespace, list[str]]:
    """parser.parse_known_args(argv), its error (printed, then an exit) as a ConfigError."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_known_args(argv) if not runs else (parser.parse_args(argv), [])
        except SystemExit:
            message = (err.getvalue().strip().splitlines() or ["--help is not a job's flag"])[-1]
    raise ConfigError(f"entrypoint {entrypoint!r}: {runs}{message}")


def job_asks(entrypoint: str, env_vars: dict[str, str] | None = None) -> tuple[str, dict[str, resources.ResourceAsk]]:
    """The stage an entrypoint runs (its first job script) and the ask of each actor role it starts."""
    return entrypoint_jobs(entrypoint, env_vars)[0]
