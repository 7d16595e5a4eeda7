"""The argument parser of every entry point (`simmerge`, the `jobs/` scripts): a usage error in
one line, as every other error is, naming the --help to read (argparse prints its whole usage
block first)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
