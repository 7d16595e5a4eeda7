"""The body shared by every jobs/<stage>.py entry point.

A job is the `simmerge <command>` program run inside a Ray job: it parses the job flags (config,
output path or URI, resource asks), exports the asks as SIMMERGE_* variables, runs each step as
`python -m simmerge_ray ...` (a child that inherits them and RAY_ADDRESS, so it joins the cluster
the job was submitted to, set by `ray job submit` and by KubeRay, or starts a local Ray), and
publishes the output to object storage when `--out` is a URI. Flags the job does not know are
passed on to the command unchanged: each command's flags are defined once, by the command.

simmerge_ray is imported from the job's working directory (`ray job submit --working-dir .` puts
it first on PYTHONPATH) or, run without Ray, from the installed package (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import simmerge_ray
from simmerge_ray import resources, storage
from simmerge_ray.errors import SimMergeError

NOT_AVAILABLE = 3  # exit status of a job whose stage this version does not have yet


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
    flags = ["--cpus-per-worker", str(r.streaming.num_cpus)]
    return flags + (["--workers", str(r.max_actors)] if r.max_actors else [])


STAGES: dict[str, Stage] = {
    "zoo_build": Stage((Step(("zoo", "build"), "zoo"),)),
    "probe": Stage((Step(("probe",), "probe", config="--catalog"),)),
    # Structural features first (it creates the folder), then the functional ones, which join the
    # two into features.parquet; flags the job does not know go to the functional step.
    "features": Stage((Step(("features", "structural"), "features", config="--catalog", extras=False),
                       Step(("features", "functional"), "features", config="--catalog", overwrite=False))),
    "label": Stage((Step(("label",), "zoo", config="--catalog", overwrite=False),)),  # resumes from its cache
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
    parser = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py", allow_abbrev=False,
        description=f"Ray job: `{spec.commands}`. Unknown flags go to the command as they are.")
    parser.add_argument("--config", help="the stage's config file (path or URI)")
    parser.add_argument("--out", help="output folder: a path, or a URI (s3://, gs://, file://...) "
                                      "that the finished output is uploaded to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--staging-dir", default=None,
                        help="local folder for outputs bound for a URI (default: the system temp dir)")
    resources.add_resource_flags(parser)
    return parser


def unavailable(stage: str) -> str | None:
    """Why this version cannot run `stage` (a manifest written for a newer one), or None."""
    cli = Path(simmerge_ray.__file__).parent / "cli"
    for step in STAGES[stage].steps:
        if not (cli / f"{step.module}.py").is_file():
            return f"simmerge_ray/cli/{step.module}.py does not exist"
    return None


def run_command(argv: list[str]) -> int:
    """`simmerge ARGV` as a child process; its output goes to the job's log. A job stopped by
    `ray job stop` (SIGTERM) stops the command too rather than leaving it running."""
    child = subprocess.Popen([sys.executable, "-m", "simmerge_ray", *argv])

    def stop(signum: int, _frame: object) -> None:
        child.terminate()
        child.wait()
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def run(stage: str, argv: list[str] | None = None) -> int:
    """Run the job of `stage`; returns the process exit status (0 = success)."""
    args, extra = build_parser(stage).parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    prog = f"jobs/{stage}.py"
    reason = unavailable(stage)
    if reason:
        print(f"{prog}: stage {stage!r} is not available in this version of simmerge_ray "
              f"(it runs `{STAGES[stage].commands}`: {reason})", file=sys.stderr)
        return NOT_AVAILABLE
    staging = Path(tempfile.mkdtemp(prefix=f"simmerge-{stage}-", dir=args.staging_dir))
    try:
        asks = resources.resources_from_flags(args)
        resources.export(asks)
        config = storage.download_file(args.config, staging / "config") if args.config else None
        target = storage.resolve(args.out) if args.out else None
        local_out = None if target is None else (target.path if target.is_plain_path else str(staging / "out"))
        if target is not None and not target.is_plain_path and storage.exists(target) and not args.overwrite:
            raise storage.StorageError(f"{args.out}: output already exists (pass --overwrite to replace it)")
        for step in STAGES[stage].steps:
            command = command_argv(step, args, extra, local_out, asks, None if config is None else str(config))
            print(f"{prog}: simmerge {' '.join(command)}", flush=True)
            status = run_command(command)
            if status != 0:
                return status
        if target is not None and not target.is_plain_path:
            manifest = storage.upload_dir(Path(local_out), args.out, overwrite=args.overwrite)
            print(f"{prog}: uploaded {len(manifest['files'])} files ({manifest['bytes'] / 1e6:.1f} MB) "
                  f"to {args.out}", flush=True)
        return 0
    except SimMergeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(stage: str) -> None:
    sys.exit(run(stage))
