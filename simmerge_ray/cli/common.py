"""Helpers shared by subcommands: human-readable sizes and the verdict line (library functions
that the commands print with)."""

from simmerge_ray.report.verdict import verdict_line  # noqa: F401
from simmerge_ray.sizes import human_bytes, human_rate  # noqa: F401
