"""The argument parser of every entry point (`simmerge`, the `jobs/` scripts): a usage error in
one line, as every other error is, naming the --help to read (argparse prints its whole usage
block first)."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn


# Options that mean the same under another name in another command: how many actors a pool starts
# is `--workers` where the command runs a pool of its own (merge, label, structural, fit) and
# `--actors` where Ray Data runs it (probe, functional features, plan-batch).
SYNONYMS = {"--workers": "--actors", "--actors": "--workers"}


def closest_option(flag: str, parser: argparse.ArgumentParser, *, cutoff: float) -> str | None:
    """The --option of `parser` an unknown `flag` (without its `=VALUE`) most resembles, at a
    difflib ratio of at least `cutoff`, or its synonym there (SYNONYMS), or None: the "did you
    mean" of a misspelt flag."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag, options, n=1, cutoff=cutoff)
    synonym = SYNONYMS.get(flag) if SYNONYMS.get(flag) in options else None
    if synonym and close and close[0] != synonym:  # plan-batch --workers: its --actors, or its --merge-workers
        return f"{synonym} or {close[0]}"
    return synonym or (close[0] if close else None)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A word that starts with a minus and a digit is a value, as argparse takes `-5`: `--shard-size
        # -1G` was "expected one argument" rather than the option's own "size must be positive".
        # (No option of ours is spelt like a negative number.)
        self._negative_number_matcher = re.compile(r"^-\.?[0-9]")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        """Every value given on the command line, before its type reads it: an empty or blank one
        is refused. No option takes one, and `Path("")` is the current folder: `--out ""` wrote a
        stage's files among the user's own there, `convert ""` converted whatever it held."""
        command = isinstance(action, argparse._SubParsersAction)  # its values are the command's arguments:
        if not command and isinstance(arg_string, str) and not arg_string.strip():  # its parser names the option
            raise argparse.ArgumentError(action, "an empty value (give a file, folder, name or number)")
        return super()._get_value(action, arg_string)
