"""Bad or careless zoo configs for `simmerge zoo build`: one line naming the file and field, before
any training where the config alone shows the fault; nothing published and the config untouched
where it only shows in training. (Duplicate names, 'base', seeds and a domain listed twice are in
test_pipeline_inputs.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.zoo_config import ZooConfig
from input_checks import one_line_error, tree_hash  # beside this file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "zoo_tiny.yaml"


def _zoo(folder: Path, old: str, new: str) -> Path:
    raw = TINY.read_text()
    assert raw.count(old) == 1, old
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "zoo.yaml"
    path.write_text(raw.replace(old, new, 1))
    return path


@pytest.mark.parametrize("text, says", [
    ("", "the zoo config is empty"),
    ("# nothing but a comment\n", "the zoo config is empty"),
    ("- base\n- domains\n", "the zoo config holds a list, not a mapping of sections"),
    ("zoo\n", "the zoo config holds a str, not a mapping of sections"),
])
def test_an_empty_or_non_mapping_config_says_what_it_holds(tmp_path, capsys, no_ray, text, says):
    """An empty file or a YAML list was `config: Input should be a valid dictionary or instance of
    ZooConfig`: pydantic's class name, not what is wrong with the file."""
    from simmerge_ray.cli import main

    bad = tmp_path / "zoo.yaml"
    bad.write_text(text)
    assert main(["zoo", "build", "--config", str(bad), "--out", str(tmp_path / "z")]) == 2
    err = one_line_error(capsys, f"{bad}: {says}")
    assert "ZooConfig" not in err and not (tmp_path / "z").exists()


@pytest.mark.parametrize("old, new, field, message", [
    ("name: math-a,", "name: CODE-A,", "domains.math.variants.0.name",
     "'CODE-A' is already the name of domains.code.variants.0 ('code-a': names that differ only in case share a "
     "folder)"),
    ("name: inst-a", "name: Base", "domains.instruct.variants.0.name",
     "'Base' differs from 'base' only in case, and 'base' is reserved for the base model"),
])
def test_names_that_differ_only_in_case_are_refused(tmp_path, old, new, field, message):
    """Expert names are checkpoint folders: on a case-insensitive file system (macOS, Windows)
    `CODE-A` and `code-a` are one folder, so the second expert's weights replaced the first's and
    the catalog listed both over them (and `Base` replaced the base). Refused at load."""
    bad = _zoo(tmp_path, old, new)
    with pytest.raises(ConfigError) as e:
        ZooConfig.load(bad)
    assert str(e.value).startswith(f"{bad}: {field}: {message}"), e.value
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("old, new, field, says", [
    ("name: code-a, steps: 40,", "name: code-a, steps: 1000000000000,", "domains.code.variants.0.steps",
     "1000000000000 steps x batch_size 16 x data.seq_len 64 = 1.02e+15 tokens"),
    ("base: {steps: 60, lr: 0.004, batch_size: 8,", "base: {steps: 60, lr: 0.004, batch_size: 100000000000,",
     "base.steps", "60 steps x batch_size 100000000000 x data.seq_len 64"),
    ("eval_examples: 24", "eval_examples: 20000", "data.eval_examples",
     "Input should be less than or equal to 10000"),
    ("probe_prompts: 8", "probe_prompts: 100000000000", "data.probe_prompts",
     "Input should be less than or equal to 10000"),
])
def test_an_absurd_budget_is_refused_before_any_work(tmp_path, capsys, no_ray, old, new, field, says):
    """`steps: 1e12` (or a huge batch) trained every other model, then hung packing the expert's
    data; `eval_examples: 20000` hung drawing examples (math has some 15,000 distinct ones), Ray
    started. Refused at load."""
    from simmerge_ray.cli import main

    bad = _zoo(tmp_path / "cfg", old, new)
    before = tree_hash(tmp_path / "cfg")
    assert main(["zoo", "build", "--config", str(bad), "--out", str(tmp_path / "z")]) == 2
    one_line_error(capsys, f"{bad}: {field}: {says}")
    assert not (tmp_path / "z").exists() and tree_hash(tmp_path / "cfg") == before


@pytest.mark.parametrize("old, new, field, who", [
    ("base: {steps: 60, lr: 0.004,", "base: {steps: 60, lr: 100000.0,", "base.lr", "base"),
    ("name: code-a, steps: 40, lr: 0.004,", "name: code-a, steps: 41, lr: 100000.0,", "domains.code.variants.0.lr",
     "code-a"),
])
def test_a_diverging_learning_rate_fails_the_build_and_publishes_nothing(ray_cluster, tmp_path, capsys, old, new,
                                                                         field, who):
    """A learning rate that diverges trained a model of NaN weights: the build saved it, scored it
    NaN and published the zoo (the base's NaN cached for every later build), without a word.
    Now one line naming the stage's `lr`; no zoo, no temporary folder, the config untouched."""
    from simmerge_ray.cli import main

    bad = _zoo(tmp_path / "cfg", old, new)
    before = tree_hash(tmp_path / "cfg")
    out = tmp_path / "runs" / "z"
    assert main(["zoo", "build", "--config", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"simmerge zoo: error: {bad}: {field}: {who} diverged (loss nan at step "), last
    assert not (tmp_path / "runs").exists() and tree_hash(tmp_path / "cfg") == before


def test_an_eval_set_too_small_for_its_standard_error_is_warned_not_refused(ray_cluster, tmp_path, capsys):
    """The tiny zoo's 24 eval examples give accuracies a standard error up to 0.10, three times
    the labels' 0.03 noise floor, and nothing said so. Now the zoo is built and one warning line
    follows it (after, so that an error of the build stays one line). The shipped zoos' 256 are
    not warned. Last in this file: the base and skills stage come from the pretrain cache."""
    from simmerge_ray.cli import main

    out = tmp_path / "z"
    assert main(["zoo", "build", "--config", str(TINY), "--out", str(out)]) == 0
    assert (out / "catalog.yaml").is_file()
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line and "simmerge" in line]
    assert warned == [
        f"simmerge: warning: {TINY}: data.eval_examples: 24 examples per domain give accuracies a standard error "
        "of up to 0.102 (over 0.03, the labels' noise floor); use 256 or more for results, fewer only for tests"]
    for shipped in ("zoo_default.yaml", "zoo_large.yaml", "zoo_qwen2_reseeded.yaml"):
        assert ZooConfig.load(CONFIGS / shipped).eval_warning() is None
