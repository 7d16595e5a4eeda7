"""The `simmerge` command. Each subcommand lives in its own module under this package and
exposes `register(subparsers)`; user errors print one line and exit 2, never a traceback.

Every command's help shows each option's default and an example (its parser's `epilog`);
`--verbose` on any command keeps Ray's own logs, which are otherwise kept below warnings.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

from simmerge_ray import __version__
from simmerge_ray.arg_parser import Parser, closest_option
from simmerge_ray.errors import SimMergeError

# Modules under simmerge_ray.cli, each adding one or more subcommands.
COMMAND_MODULES: tuple[str, ...] = (
    "merge", "convert", "zoo", "features", "probe", "selector", "plan", "calibrate", "plan_batch", "serve", "demo",
    "transfer",
)


# Commands whose module registers nothing else: `simmerge merge ...` builds only its own parser,
# so a merge does not pay for importing every other command's dependencies (polars, pydantic).
SOLE_MODULE: dict[str, str] = {"merge": "merge", "convert": "convert", "plan": "plan", "plan-batch": "plan_batch",
                               "calibrate": "calibrate", "transfer": "transfer"}


class HelpFormatter(argparse.HelpFormatter):
    """Texts with line breaks (the epilog's examples) as written, others wrapped; an option's
    default appended to its help, except for flags, options without a default (None) and help
    that already says what the default is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS))
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command path, parser) of every runnable subcommand, e.g. (('features', 'structural'), p)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    seen: set[int] = set()
    for name, sub in subs[0].choices.items():
        if id(sub) not in seen:  # an alias maps to the same parser
            seen.add(id(sub))
            yield from leaf_parsers(sub, (*path, name))


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(sub)


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = Parser(
        prog="simmerge",
        description="Choose how to merge LLM checkpoints from similarity signals, then merge them.",
        epilog="example:\n  simmerge merge my-merge.yaml --out merged/\n"
               "  simmerge COMMAND --help   (each command's options, defaults and an example)",
    )
    parser.add_argument("--version", action="version", version=f"simmerge {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"simmerge_ray.cli.{name}").register(subparsers)
    for p in _all_parsers(parser):
        p.formatter_class = HelpFormatter
        for action in p._actions:  # `simmerge X --help` opens with the line `simmerge --help` lists X with
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    sub = action.choices[choice.dest]
                    if sub.description is None and choice.help:
                        sub.description = choice.help[0].upper() + choice.help[1:] + "."
    for _, p in leaf_parsers(parser):
        p.add_argument("--verbose", action="store_true",
                       help="show Ray's own logs (INFO lines, Ray Data and Tune progress reports)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from simmerge_ray.mkl_vendor import activate

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and not {"-h", "--help", "--version"} & set(argv):
        activate()  # before the command imports torch (on AMD CPUs: MKL's kernels for their instruction set)
    from simmerge_ray.ray_session import set_verbose, shutdown_started_ray

    modules = (SOLE_MODULE[command],) if command in SOLE_MODULE else COMMAND_MODULES
    parser = build_parser(modules)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, not by `simmerge` (whose --help lists no option of it)
        leaf = _command_parser(parser, args, argv)
        leaf.error(unrecognized(leaf, unknown))
    if args.verbose:
        set_verbose(True)  # never reset: stages a `demo --verbose` runs in this process stay verbose
    previous = _interrupt_on_sigterm()
    ray_before = _ray_up()
    try:
        return int(args.func(args) or 0)
    except SimMergeError as e:
        print(f"simmerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (kill, timeout, ray job stop): temporary outputs are gone
        print(f"simmerge {args.command}: interrupted; nothing was published (outputs appear only when "
              f"complete, and caches resume)", file=sys.stderr)
        if not ray_before and _ray_up():  # the command's own Ray, not a caller's (tests, notebooks)
            try:
                shutdown_started_ray(130)  # bounded: after a SIGTERM it was seen hanging for minutes
            except KeyboardInterrupt:  # a second Ctrl-C: leave the rest to Ray's exit handler
                pass
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ray_up() -> bool:
    """Whether this process is connected to Ray (without importing it where no command has)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the subcommand that parsed `args` (demo and pipeline share a function: the
    one whose words the command line starts with)."""
    words = tuple(a for a in argv if not a.startswith("-"))
    mine = [(path, p) for path, p in leaf_parsers(parser) if p._defaults.get("func") is args.func]
    return next((p for path, p in mine if words[:len(path)] == path), mine[0][1] if mine else parser)


def unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """argparse's "unrecognized arguments" line, with the option of this command each misspelt one
    most resembles (`--max-actor` -> `--max-actors`)."""
    flags = [word.split("=")[0] for word in unknown if word.startswith("--")]
    hints = [f"{flag}: did you mean {close}?" for flag in flags if (close := closest_option(flag, parser, cutoff=0.7))]
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler that unwinds like Ctrl-C."""
    raise KeyboardInterrupt


def _interrupt_on_sigterm():
    """Make SIGTERM unwind like Ctrl-C, so temporary folders are removed on the way out instead
    of being left for the next run to clean; the handler it replaced (None: left alone, where
    the caller installed its own, or off the main thread)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, raise_interrupt)


if __name__ == "__main__":
    sys.exit(main())
