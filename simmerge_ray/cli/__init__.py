"""The `simmerge` command. Each subcommand lives in its own module under this package and
exposes `register(subparsers)`; user errors print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from simmerge_ray.errors import SimMergeError

# Modules under simmerge_ray.cli, each adding one or more subcommands.
COMMAND_MODULES: tuple[str, ...] = (
    "merge", "convert", "zoo", "features", "probe", "selector", "plan", "plan_batch", "serve", "demo", "transfer",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simmerge",
        description="Choose how to merge LLM checkpoints from similarity signals, then merge them.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"simmerge_ray.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SimMergeError as e:
        print(f"simmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
