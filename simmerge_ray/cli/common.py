"""Helpers shared by subcommands: human-readable sizes and the verdict line (library functions
that the commands print with)."""

from simmerge_ray.report.verdict import verdict_line  # noqa: F401
from simmerge_ray.sizes import human_bytes, human_rate  # noqa: F401


def at_least_one(text: str) -> int:
    """argparse type of a count (workers, actors): a whole number >= 1, else one line naming the flag."""
    return _whole_number(text, 1)


def at_least_zero(text: str) -> int:
    """argparse type of a limit where 0 means something (--max-plans 0: measure nothing new): a
    whole number >= 0; a negative one would slice from the end (todo[:-1] dropped a plan)."""
    return _whole_number(text, 0)


def at_least_two(text: str) -> int:
    """argparse type of a number of folds: a whole number >= 2 (one fold holds nothing out)."""
    return _whole_number(text, 2)


SEED_MAX = 2**32 - 1  # Ray Tune's search seeds numpy's RandomState, which takes 0 to 2**32 - 1


def seed(text: str) -> int:
    """argparse type of a --seed: 0 to SEED_MAX. A negative one was a ValueError traceback from
    numpy's generator once the folds were drawn, a larger one an overflow in torch or Tune."""
    import argparse

    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is not a seed from 0 to {SEED_MAX}")
    return value


def tcp_port(text: str) -> int:
    """argparse type of a TCP port: one line naming the flag, not Serve's traceback after Ray started."""
    import argparse

    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def features_folder(text: str) -> str:
    """argparse type of a planner's --features: the features folder (its table and the Gram
    matrices the planner propagates). Its features.parquet, which `fit` and `bandit-init` take
    as well, stands for the folder; another file is one line (it read as a folder: "Not a
    directory" on a file inside it)."""
    import argparse
    from pathlib import Path

    p = Path(text)
    try:
        if p.is_file() and p.name == "features.parquet":
            return str(p.resolve().parent)  # a link's target's folder: the Gram files lie beside the table
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file; give the features folder (`simmerge features` "
                                             f"writes features.parquet and the Gram files there)")
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot read it ({e.strerror or e})") from None
    return text


def _whole_number(text: str, least: int) -> int:
    import argparse

    value = _int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not at least {least}")
    return value


def _int(text: str) -> int:
    import argparse

    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive(text: str) -> float:
    """argparse type of a positive, finite amount (CPUs per worker, the bandit's variances and weights)."""
    import argparse
    import math

    value = _number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def at_least_zero_number(text: str) -> float:
    """argparse type of a finite amount >= 0 (the bandit's exploration: 0 is greedy)."""
    import argparse
    import math

    value = _number(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _number(text: str) -> float:
    import argparse

    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def open_fraction(text: str) -> float:
    """argparse type of a share strictly between 0 and 1 (a held-out fraction): one line naming
    the flag before any table is read."""
    import argparse

    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction strictly between 0 and 1")
    return value


def name_listing(entries: list[tuple[str, str]], width: int = 100) -> str:
    """`name  what it does` lines for a --help epilog (merge methods, arms), the texts aligned and
    wrapped beside the names."""
    import textwrap

    pad = max(len(n) for n, _ in entries) + 4
    return "\n".join(textwrap.fill(doc, width=width, initial_indent=f"  {name:<{pad - 2}}",
                                    subsequent_indent=" " * pad) for name, doc in entries)
