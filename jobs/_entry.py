"""The body shared by every jobs/<stage>.py entry point.

A job is the `simmerge <command>` program run inside a Ray job: it parses the job flags (config,
output path or URI, resource asks), exports the asks as SIMMERGE_* variables, runs each step as
`python -m simmerge_ray ...` (a child that inherits them and RAY_ADDRESS, so it joins the cluster
the job was submitted to, set by `ray job submit` and by KubeRay, or starts a local Ray), and
publishes the output to object storage when `--out` is a URI (written first under
`--staging-dir`, which on a cluster every node must mount, and kept there after a failure so that
the same command picks its work up). Flags the job does not know are
passed on to the command unchanged: each command's flags are defined once, by the command. One
that no command of the job takes but that is close to a job flag (`--cpus-per-actr`) is refused
before any step runs, naming the job flag.

simmerge_ray is imported from the job's working directory (`ray job submit --working-dir .` puts
it first on PYTHONPATH) or, run without Ray, from the installed package (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import simmerge_ray
from simmerge_ray import job_entrypoint, resources, storage
from simmerge_ray.errors import SimMergeError
from simmerge_ray.io.file_lock import LockHeld, exclusive_lock
from simmerge_ray.io.out_checks import PUBLISH_ENV
from simmerge_ray.job_stages import STAGES, build_parser, command_argv, job_args
from simmerge_ray.placement import NODE_TYPES_ENV

NOT_AVAILABLE = 3  # exit status of a job whose stage this version does not have yet


def unavailable(stage: str) -> str | None:
    """Why this version cannot run `stage` (a manifest written for a newer one), or None."""
    cli = Path(simmerge_ray.__file__).parent / "cli"
    for step in STAGES[stage].steps:
        if not (cli / f"{step.module}.py").is_file():
            return f"simmerge_ray/cli/{step.module}.py does not exist"
    return None


def run_command(argv: list[str], env: dict[str, str] | None = None) -> int:
    """`simmerge ARGV` as a child process (with `env` added to this one's); its output goes to the
    job's log. A job stopped by `ray job stop` (SIGTERM) stops the command too rather than
    leaving it running."""
    child = subprocess.Popen([sys.executable, "-m", "simmerge_ray", *argv],
                             env={**os.environ, **env} if env else None)

    def stop(signum: int, _frame: object) -> None:
        child.terminate()
        child.wait()
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(stage: str, argv: list[str] | None = None) -> int:
    """Run the job of `stage`; returns the process exit status (0 = success)."""
    args, extra = build_parser(stage).parse_known_args(argv)
    prog = f"jobs/{stage}.py"
    reason = unavailable(stage)
    if reason:
        print(f"{prog}: stage {stage!r} is not available in this version of simmerge_ray "
              f"(it runs `{STAGES[stage].commands}`: {reason})", file=sys.stderr)
        return NOT_AVAILABLE
    try:
        extra = job_args(stage, args, extra)
        job_entrypoint.check_misspelt_job_flags(stage, extra)
        asks = resources.resources_from_flags(args)
        resources.export(asks)
        target = storage.resolve(args.out) if args.out else None
        if target is not None and not target.is_plain_path:
            return _run_staged(stage, args, extra, asks, target)
        with tempfile.TemporaryDirectory(prefix=f"simmerge-{stage}-") as tmp:
            config = storage.download_file(args.config, Path(tmp)) if args.config else None
            return _run_steps(stage, args, extra, asks, None if target is None else target.path, config)
    except SimMergeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def _run_steps(stage: str, args: argparse.Namespace, extra: list[str], asks: resources.StageResources,
               local_out: str | None, config: Path | None, env: dict[str, str] | None = None) -> int:
    for step in STAGES[stage].steps:
        command = command_argv(step, args, extra, local_out, asks, None if config is None else str(config))
        # The asks it runs under (and the node types its pools are sized against), as a line one
        # can paste into a shell to rerun the step.
        asked = [f"{var}={os.environ[var]}" for var in (*resources.ENV_VARS.values(), NODE_TYPES_ENV)
                 if var in os.environ]
        print(f"jobs/{stage}.py: {shlex.join([*asked, 'simmerge', *command])}", flush=True)
        status = run_command(command, env)
        if status != 0:
            return status
    return 0


def staging_folder(stage: str, out: str, staging_dir: str | None) -> Path:
    """Where an output bound for the URI `out` is written first: named by the stage and the URI,
    so that a failed run's work (label's measured merges, the pipeline's finished stages, the
    probe cache) is found again by the same command, as with a local --out."""
    key = hashlib.blake2b(f"{stage}|{out}".encode(), digest_size=8).hexdigest()
    return Path(staging_dir or tempfile.gettempdir()) / f"simmerge-{stage}-{key}"


STAGING_MARKER = ".simmerge-staging.json"  # {"stage", "out"}: the folder is this job's, to reuse and remove
_STAGING_ENTRIES = {"config", "out", ".lock", STAGING_MARKER}  # all a staging folder ever holds


def claim_staging(staging: Path, stage: str, out: str) -> list[Path]:
    """Create the staging folder, or take up the one an earlier run of this job left; refuse a
    folder of that name that is not (a job writes into it, then removes it whole). Returns the
    --staging-dir folders above it that it created, innermost first (they go with it)."""
    record = {"stage": stage, "out": out}
    marker = staging / STAGING_MARKER
    if staging.exists():
        try:
            mine = json.loads(marker.read_text()) == record
        except (OSError, ValueError):  # no marker: an older version's folder holds only its own entries
            mine = staging.is_dir() and {p.name for p in staging.iterdir()} <= _STAGING_ENTRIES
        if not mine:
            raise storage.StorageError(f"{staging}: exists and is not this job's staging folder for {out} "
                                       f"(simmerge would write into it and remove it); move it away or pass "
                                       f"another --staging-dir")
    created = [d for d in (staging, *staging.parents) if not d.exists()]  # innermost first
    new_marker = False
    try:
        staging.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            new_marker = True
            marker.write_text(json.dumps(record))
    except OSError as e:  # --staging-dir is a file, or cannot be created or written
        _undo_claim(marker if new_marker else None, created)
        raise storage.StorageError(f"--staging-dir {staging.parent}: cannot hold the staging folder "
                                   f"({e.strerror or e})") from None
    return [d for d in created if d != staging]


def _undo_claim(marker: Path | None, created: list[Path]) -> None:
    """Remove what a failed claim made: the marker it began to write, then the folders it
    created, innermost first (one another job has put something in since stays)."""
    try:
        if marker is not None:
            marker.unlink(missing_ok=True)
    except OSError:
        return  # a folder holding it stays
    for folder in created:
        try:
            folder.rmdir()
        except FileNotFoundError:  # mkdir failed before making this one
            continue
        except OSError:
            break


def _run_staged(stage: str, args: argparse.Namespace, extra: list[str], asks: resources.StageResources,
                target: storage.Location) -> int:
    """Run the steps into a staging folder, upload it to `target` when they succeed and remove it;
    after a failure it is kept (and said so) for the next run to resume, unless the failure left
    no work there (a bad config refused before any step wrote)."""
    prog = f"jobs/{stage}.py"
    if storage.exists(target) and not args.overwrite:
        raise storage.StorageError(f"{args.out}: output already exists (pass --overwrite to replace it)")
    staging = staging_folder(stage, args.out, args.staging_dir)
    # The --staging-dir folders this run creates go with the staging folder (if they hold nothing else).
    created = claim_staging(staging, stage, args.out)
    done = False  # uploaded, or failed with no work to resume: the staging folder goes
    try:
        with exclusive_lock(staging / ".lock", blocking=False):
            try:
                config = storage.download_file(args.config, staging / "config") if args.config else None
                # Where on this machine's disk the output ends up (file:///abs/path): each command
                # refuses it inside one of its inputs, as it refuses a plain --out there.
                publish = {PUBLISH_ENV: target.local_path} if target.local_path is not None else None
                status = _run_steps(stage, args, extra, asks, str(staging / "out"), config, publish)
                if status != 0:
                    return status
                manifest = storage.upload_dir(staging / "out", args.out, overwrite=args.overwrite)
                done = True
            finally:
                if not done:  # a failed step, a failed upload, or an interruption
                    done = not _holds_work(staging / "out")
                    if not done:
                        print(f"{prog}: kept the unfinished work at {staging}; the same command picks it up",
                              file=sys.stderr, flush=True)
            # The command's own lines (its output path, a `next:` hint) named the staging folder,
            # which goes now: say where their files are.
            print(f"{prog}: uploaded {len(manifest['files'])} files ({manifest['bytes'] / 1e6:.1f} MB) "
                  f"to {args.out}; paths printed above under {staging / 'out'} are there now (the staging "
                  f"folder is removed)", flush=True)
    except LockHeld:
        raise storage.StorageError(f"{args.out}: another job is writing this output now (its staging folder "
                                   f"{staging} is locked)") from None
    finally:
        if done:  # after the lock is released: the lock file lives in the folder
            shutil.rmtree(staging, ignore_errors=True)
            for folder in created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:  # not empty: another job's staging folder is there now
                    break
    return 0


def _holds_work(out: Path) -> bool:
    """Whether a failed run left anything under its staging output for the next run to resume."""
    return out.is_dir() and any(out.iterdir())


def main(stage: str) -> None:
    sys.exit(run(stage))
