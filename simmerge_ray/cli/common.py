"""Helpers shared by subcommands: Ray start-up that works by hand and under `ray job submit`."""

from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to (RAY_ADDRESS), or start a local Ray.

    Idempotent: a second call in the same process is a no-op.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
