"""Bad or unusual command lines of `bandit-init`, `bandit-sim` and `serve`: one line, exit 2,
naming the option or file at fault, nothing written and the inputs unchanged. Each case here
once printed a traceback, blamed the wrong thing, or ignored an option without a word."""

from __future__ import annotations

from pathlib import Path

import pytest

from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError
from input_checks import one_line_error, tree_hash  # beside this file


@pytest.fixture()
def tables(tmp_path: Path) -> Path:
    """A folder `in/` holding labels.parquet and a features folder `feats/features.parquet`."""
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=4, seed=2))
    (tmp_path / "in" / "feats").mkdir(parents=True)
    labels.write_parquet(tmp_path / "in" / "labels.parquet")
    features.write_parquet(tmp_path / "in" / "feats" / "features.parquet")
    return tmp_path / "in"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    one_line_error(capsys, *needles)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert cli_main(argv) == 2
    one_line_error(capsys, *needles)


SIM = ["bandit-sim", "--synthetic", "--rounds", "5", "--repeats", "1", "--add-at", "2"]


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "argument --seed: -1 is not a seed"),  # was numpy's ValueError traceback
    (["--rounds", "0"], "argument --rounds: 0 is not at least 1"),  # was "rounds and repeats must be >= 1"
    (["--repeats", "-2"], "argument --repeats: -2 is not at least 1"),
    (["--test-frac", "1"], "argument --test-frac: 1 is not a fraction strictly between 0 and 1"),
    (["--test-frac", "nan"], "argument --test-frac: nan is not a fraction"),
    (["--add-at", "-1"], "argument --add-at: -1 is not at least 0"),
    (["--noise-var", "0"], "argument --noise-var: 0 is not a positive number"),  # was "noise_var must be..."
    (["--prior-var", "-1"], "argument --prior-var: -1 is not a positive number"),
    (["--exploration", "-0.5"], "argument --exploration: -0.5 is not a finite number >= 0"),  # was the library's
])
def test_bandit_sim_options_out_of_range_name_the_option(tmp_path: Path, capsys, flags: list[str],
                                                         needle: str) -> None:
    _usage_error([*SIM, "--out", str(tmp_path / "sim"), *flags], capsys, needle)
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "argument --seed: -1 is not a seed"),  # was numpy's ValueError traceback
    (["--warm-weight", "0"], "argument --warm-weight: 0 is not a positive number"),
    (["--noise-var", "inf"], "argument --noise-var: inf is not a positive number"),
])
def test_bandit_init_options_out_of_range_name_the_option(tables: Path, tmp_path: Path, capsys, flags: list[str],
                                                          needle: str) -> None:
    _usage_error(["bandit-init", "--state", str(tmp_path / "state"), "--features", str(tables / "feats"),
                  "--labels", str(tables / "labels.parquet"), *flags], capsys, needle)
    assert not (tmp_path / "state").exists()


def test_bandit_init_refuses_labels_and_operators_together(tables: Path, tmp_path: Path, capsys) -> None:
    """With --labels the arms are the labels' operators: --operators was dropped without a word."""
    _usage_error(["bandit-init", "--state", str(tmp_path / "state"), "--features", str(tables / "feats"),
                  "--labels", str(tables / "labels.parquet"), "--operators", "linear"], capsys,
                 "argument --operators: not allowed with argument --labels")
    assert not (tmp_path / "state").exists()


def test_bandit_sim_refuses_features_with_synthetic(tables: Path, tmp_path: Path, capsys) -> None:
    """--synthetic makes its own table: --features was ignored, yet named as the table in errors."""
    _refused([*SIM, "--features", str(tables / "feats"), "--out", str(tmp_path / "sim")], capsys,
             "--features goes with --labels; --synthetic makes its own feature table")
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize("command", ["bandit-init", "bandit-sim"])
def test_a_feature_table_given_as_labels_names_the_file(tables: Path, tmp_path: Path, capsys, command: str) -> None:
    """The message said "labels: missing columns", not which file."""
    table = tables / "feats" / "features.parquet"
    out = ["--state" if command == "bandit-init" else "--out", str(tmp_path / "out")]
    _refused([command, *out, "--features", str(tables / "feats"), "--labels", str(table)], capsys,
             f"{table}: missing columns ['expert', 'aux', 'operator', 'utility']")
    assert not (tmp_path / "out").exists()


def test_bandit_sim_and_serve_take_the_features_folder_bandit_init_takes(tables: Path, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    """Both said "feats: feature table not found" of the folder bandit-init had just read; an
    --out inside that folder is still refused, and the inputs are left as they were."""
    before = tree_hash(tables)
    sim = ["bandit-sim", "--labels", str(tables / "labels.parquet"), "--features", str(tables / "feats"),
           "--rounds", "5", "--repeats", "1", "--add-at", "2"]
    _refused([*sim, "--out", str(tables / "feats" / "sim")], capsys,
             "the output lies inside the input", str(tables / "feats"))
    assert cli_main([*sim, "--out", str(tmp_path / "sim")]) == 0
    assert (tmp_path / "sim" / "regret.json").is_file()
    state = tmp_path / "state"
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tables / "feats"),
                     "--operators", "linear,ties"]) == 0
    capsys.readouterr()
    import simmerge_ray.cli.serve as serve_cli

    def stop(host: str, port: int) -> None:  # everything before Ray passed
        raise ConfigError("checks passed")

    monkeypatch.setattr(serve_cli, "_check_port_free", stop)
    (tmp_path / "token").write_text("a-token-of-the-right-length\n")
    _refused(["serve", "--state", str(state), "--features", str(tables / "feats"), "--token-file",
              str(tmp_path / "token")], capsys, "simmerge serve: error: checks passed")
    assert tree_hash(tables) == before


@pytest.mark.parametrize("text, shown", [
    ("first-line-of-token\nsecond-line\n", r"'\n' at character 20"),  # a file of two lines
    ("token-with\ttab-0123456789", r"'\t' at character 11"),
    ("tökén-0123456789abcdef", "'ö' at character 2"),
])
def test_a_token_no_client_can_send_is_refused(tmp_path: Path, capsys, text: str, shown: str) -> None:
    """An HTTP header cannot carry it: serve started, and every write then answered 401."""
    from simmerge_ray.bandit.auth import load_token

    token = tmp_path / "token"
    token.write_text(text)
    with pytest.raises(ConfigError, match="a token must be one line of printable ASCII"):
        load_token(token)
    assert cli_main(["bandit-init", "--state", str(tmp_path / "state"), "--features",
                     str(_features(tmp_path)), "--operators", "linear"]) == 0
    capsys.readouterr()
    _refused(["serve", "--state", str(tmp_path / "state"), "--token-file", str(token)], capsys,
             f"{token}: the bandit token holds {shown}")
    assert load_token(_write(tmp_path / "spaced", "  a token with spaces inside  \n")) == "a token with spaces inside"


def _features(tmp_path: Path) -> Path:
    _, features = synthetic_tables(SyntheticBanditSpec(n_models=3, seed=1))
    features.write_parquet(tmp_path / "features.parquet")
    return tmp_path / "features.parquet"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bandit_init_advice_names_its_own_option(tables: Path, tmp_path: Path, capsys) -> None:
    """A folder of the user's as --state: the advice said "choose another --out", an option
    bandit-init does not have."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = tree_hash(mine)
    for flags in ([], ["--overwrite"]):
        _refused(["bandit-init", "--state", str(mine), "--features", str(tables / "feats"), "--operators", "linear",
                  *flags], capsys, f"{mine}: not written by simmerge", "choose another --state")
    assert tree_hash(mine) == before


def test_serve_names_a_state_given_as_a_file(tables: Path, tmp_path: Path, capsys) -> None:
    """`--state STATE/state.npz` said "STATE/state.npz/bandit.json: no bandit state here"."""
    state = tmp_path / "state"
    assert cli_main(["bandit-init", "--state", str(state), "--features", str(tables / "feats"),
                     "--operators", "linear"]) == 0
    capsys.readouterr()
    _refused(["serve", "--state", str(state / "state.npz")], capsys,
             f"{state / 'state.npz'}: a file, not a bandit state folder")


@pytest.mark.parametrize("new_operator, add_at, needle", [
    ("Linear", 2, "unknown operator to add 'Linear'"),
    (None, 50, "add-at round must be in [0, 5), got 50"),
])
def test_an_addition_that_cannot_be_made_is_refused_before_the_first_replay(monkeypatch, new_operator, add_at,
                                                                            needle: str) -> None:
    """replay_adding ran the whole replay of every operator before the second one refused it."""
    import simmerge_ray.bandit.simulate as sim
    from simmerge_ray.bandit.initial import usable_feature_columns

    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=4, seed=2))
    names, _ = usable_feature_columns(features)
    train, test = sim.split_by_pair(sim.replay_data(labels, features, names), 0.3, 0)

    def no_replay(*args, **kwargs):
        raise AssertionError("a replay ran before the addition was checked")

    monkeypatch.setattr(sim, "simulate", no_replay)
    with pytest.raises(ConfigError) as e:
        sim.replay_adding(train, test, sim.SimSettings(rounds=5, repeats=1), add_at=add_at, new_operator=new_operator)
    assert needle in str(e.value)
