"""Helpers shared by subcommands: Ray start-up that works by hand and under `ray job submit`,
quiet by default (`--verbose` keeps Ray's own logs), and human-readable sizes."""

from __future__ import annotations

import logging
import os
import sys

_verbose = False
# Set for Ray's processes unless --verbose (and unless the user set them): the C++ log level, and
# Tune's classic reporter (silent with verbose=0, where the new one still prints status boxes).
_QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal", "RAY_AIR_NEW_OUTPUT": "0"}
_set_here: set[str] = set()


def set_verbose(verbose: bool) -> None:
    """`--verbose`: keep Ray's INFO logs, its C++ error lines and Ray Data/Tune progress reports."""
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    return _verbose


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to (RAY_ADDRESS), or start a local Ray.

    Idempotent: a second call in the same process is a no-op. Unless `--verbose`, the console
    gets Ray's Python warnings and errors only: no INFO lines, no Tune status tables, and no C++
    log lines (such as Ray Data's harmless "constructor arguments in the object store and
    max_restarts > 0"); RAY_BACKEND_LOG_LEVEL=fatal also keeps the C++ logs of a local Ray's
    own processes out of its session log files. A variable the user set wins.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = logging.INFO
    for var, quiet in _QUIET_ENV.items():
        if not _verbose and var not in os.environ:
            os.environ[var] = quiet
            _set_here.add(var)
        elif _verbose and var in _set_here:  # a later verbose start in the same process
            os.environ.pop(var)
            _set_here.discard(var)
    if not _verbose:
        level = logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=_verbose, logging_level=level)
    if not _verbose:
        for name in ("ray.tune", "ray.train", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """Ray Data's console logs (execution plans, progress reports every 10 s) below warnings,
    unless `--verbose`; they stay in the session's ray-data.log. Call after `init_ray`."""
    if _verbose:
        return
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
            handler.setLevel(logging.WARNING)


def verdict_line(gain: float, best_fixed: str, share_of_oracle: float | None, where: str = "") -> str:
    """'verdict: SimMerge beats the best fixed arm (ties) by 3.1 points ...': `gain` is SimMerge's
    mean utility minus the best fixed arm's, as a fraction."""
    points = 100 * gain
    if points > 0:
        what = f"beats the best fixed arm ({best_fixed}) by {points:.1f} points"
    elif points == 0:
        what = f"ties with the best fixed arm ({best_fixed})"
    else:
        what = f"does not beat the best fixed arm ({best_fixed}): {points:+.1f} points"
    share = "" if share_of_oracle is None else f"; {100 * share_of_oracle:.0f}% of the oracle"
    return f"verdict: SimMerge {what}{where}{share}"


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB', 3.2e9 -> '2.98 GiB': binary units, three significant figures."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:  # 1000-1023 B reads better as 0.98 KiB
        n /= 1024
        i += 1
    if i == 0:
        return f"{n:.0f} B"
    return f"{n:.{2 if abs(n) < 10 else 1 if abs(n) < 100 else 0}f} {units[i]}"


def human_rate(n_bytes: float, seconds: float) -> str:
    """Bytes over seconds as '12.3 MiB/s' ('-' when no time was measured)."""
    return f"{human_bytes(n_bytes / seconds)}/s" if seconds > 0 else "-"
