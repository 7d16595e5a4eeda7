"""The CLI explains itself: every option has help text and shows its default, every command
has an example, `--version` prints the package's version, `merge --help` lists the methods
and `label --help` the arms, each with what it does."""

from __future__ import annotations

import argparse

import pytest

from simmerge_ray import __version__
from simmerge_ray.cli import build_parser, leaf_parsers, main
from simmerge_ray.cli.common import human_bytes, human_rate, verdict_line
from simmerge_ray.merge.operators import METHODS

PARSER = build_parser()
LEAVES = dict(leaf_parsers(PARSER))


def test_the_parser_has_the_documented_commands() -> None:
    names = {" ".join(path) for path in LEAVES}
    assert {"merge", "convert", "zoo build", "features structural", "features functional", "probe", "label",
            "fit", "evaluate-selector", "plan", "calibrate", "plan-batch", "bandit-init", "serve", "bandit-sim", "demo",
            "pipeline", "transfer"} == names


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_option_has_help_and_shows_its_default(path: tuple[str, ...]) -> None:
    parser = LEAVES[path]
    text = "".join(parser.format_help().split())  # unwrapped (argparse may break a line at a hyphen)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 8, f"{' '.join(path)} {name}: no help text"
        shown = " ".join(parser._get_formatter()._expand_help(action).split())
        assert "".join(shown.split()) in text, f"{' '.join(path)} {name}"
        default = action.default
        if action.option_strings and not any(default is v for v in (None, False, argparse.SUPPRESS)):
            assert "default" in shown.lower(), f"{' '.join(path)} {name}: default {default!r} not shown: {shown}"
            if "%(default)" not in (action.help or "") and "default" not in action.help.lower():
                assert f"(default: {default})" in shown, f"{' '.join(path)} {name}: {shown}"


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_command_says_what_it_does_first(path: tuple[str, ...]) -> None:
    """`simmerge X --help` opens (after the usage) with what X does, as `simmerge --help` lists it."""
    description = LEAVES[path].description or ""
    assert len(description) > 10 and description.endswith(".") and description[0].isupper(), (path, description)


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_every_command_has_an_example(path: tuple[str, ...]) -> None:
    epilog = LEAVES[path].epilog or ""
    assert "example" in epilog and f"simmerge {' '.join(path)} " in epilog, f"{' '.join(path)}: {epilog!r}"


def test_a_computed_default_is_shown_with_its_value() -> None:
    text = " ".join(LEAVES[("fit",)].format_help().split())
    assert "--epochs EPOCHS training epochs (full batch) (default: 300)" in text
    text = " ".join(LEAVES[("label",)].format_help().split())
    assert "--subsets-4 SUBSETS_4 4-way subsets of experts of distinct tasks, each with --orders-4 orders x " \
           "weightings x step-arm sequences (default: 6)" in text


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"simmerge {__version__}\n"


def _listing(text: str, start: str, end: str) -> dict[str, str]:
    """name -> its text (wrapped lines joined) from a `name  text` epilog listing."""
    out: dict[str, str] = {}
    for line in text.split(start)[1].split(end)[0].strip("\n").splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            name, doc = line.split(maxsplit=1)
            out[name] = doc
        else:
            out[name] += " " + line.strip()
    return out


def test_merge_help_lists_the_registered_methods_with_what_each_computes() -> None:
    listed = _listing(LEAVES[("merge",)].format_help(), "merge methods (merge_method:):", "examples:")
    assert list(listed) == sorted(METHODS) and len(METHODS) == 20
    assert all(listed[name] == METHODS[name].doc for name in METHODS)
    assert listed["della"] == "task vectors; sparsification=magprune, sign consensus=True"


def test_label_help_lists_the_declared_arms() -> None:
    from simmerge_ray.merge.arms import ARMS

    text = LEAVES[("label",)].format_help()
    listed = _listing(text, "each pair merged with every one:", "fold weightings")
    assert list(listed) == [a.name for a in ARMS]
    assert listed["ties"] == "TIES: top-50% task-vector coordinates, sign election, disjoint mean (method ties; a paper arm)"
    assert listed["linear_aux"] == "the weighted mean leaning towards the second model (25/75) (method linear)"
    weightings = _listing(text, "(--weightings):", "example:")
    assert list(weightings) == ["half", "equal", "anchor"]
    assert weightings["equal"] == "the running mean: step j gives 1/(j+1), every model ends at 1/k"


@pytest.mark.parametrize("n, want", [(0, "0 B"), (999, "999 B"), (1536, "1.50 KiB"), (123_456, "121 KiB"),
                                     (3.2e9, "2.98 GiB"), (2.22e11, "207 GiB")])
def test_sizes_are_human_readable(n: float, want: str) -> None:
    assert human_bytes(n) == want


def test_rates_and_verdicts_read_as_sentences() -> None:
    assert human_rate(3 * 1024**2, 2.0) == "1.50 MiB/s" and human_rate(5, 0.0) == "-"
    assert verdict_line(0.031, "ties", 0.82) == \
        "verdict: SimMerge beats the best fixed arm (ties) by 3.1 points; 82% of the oracle"
    assert verdict_line(-0.004, "linear", None, " on held-out pairs") == \
        "verdict: SimMerge does not beat the best fixed arm (linear): -0.4 points on held-out pairs"
