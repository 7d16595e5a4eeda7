"""Catalogs as a new user writes them, wrong: a key given twice, the base listed again as a model,
no models, an empty path, a NUL byte, the internal `source` key, a
task named by a number, a probe file that is a folder. Each is one line (exit status 2) naming
the file and the field, before anything is read or written. None of these tests starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from simmerge_ray.catalog import Catalog, ModelEntry, TaskEntry
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError
from simmerge_ray.probes.errors import ProbeError
from simmerge_ray.probes.loading import load_probe_texts
from input_checks import one_line_error, tree_hash  # beside this file

COMMANDS = (["probe"], ["features", "structural"], ["features", "functional"], ["label"])
TASKS = "tasks:\n  code: {probes: p.jsonl, eval: e.jsonl}\n  math: {probes: p.jsonl, eval: e.jsonl}\n"


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """Folders where checkpoints go (the catalog is refused before any is opened) and task files."""
    root = tmp_path / "zoo"
    for name in ("base", "a", "b"):
        (root / name).mkdir(parents=True)
    (root / "p.jsonl").write_text('{"text": "def f():"}\n')
    (root / "e.jsonl").write_text('{"prompt": "1 + 1 =", "answer": " 2"}\n')
    return root


# The catalog's text, and what its one line must say after the file's name.
BAD = {
    "models given twice": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n"
                           "models:\n  - {name: b, path: b, task: math}\n" + TASKS,
                           "line 4, column 1: key 'models' given twice in one mapping"),
    "a key given twice in a model": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n"
                                     "  - {name: b, path: b, path: a, task: math}\n" + TASKS,
                                     "key 'path' given twice in one mapping"),
    "a task given twice": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n  - {name: b, path: b, task: math}\n"
                           + TASKS + "  code: {eval: e.jsonl}\n", "key 'code' given twice in one mapping"),
    "the base listed as a model": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n"
                                   "  - {name: b, path: ./base/, task: math}\n" + TASKS,
                                   "models[1] (name 'b'): path {zoo}/base is the base's; "
                                   "the base is listed once, under 'base'"),
    "no models": ("base: base\nmodels: []\n" + TASKS, "models: the list is empty"),
    "an empty path": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n  - {name: b, path: '', task: math}\n"
                      + TASKS, "models[1] (name 'b').path: Value error, an empty path"),
    "a NUL byte in a path": ("base: base\nmodels:\n  - {name: a, path: a, task: code}\n"
                             "  - {name: b, path: \"b\\0\", task: math}\n" + TASKS, "models[1] (name 'b').path: "
                                                                                   "Value error, a path may not hold a NUL byte"),
    "the internal source key": ("source: zoo\nbase: base\nmodels:\n  - {name: a, path: a, task: code}\n"
                                "  - {name: b, path: b, task: math}\n" + TASKS, "source: not a catalog key"),
}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("case", BAD)
def test_a_bad_catalog_is_one_line_and_nothing_is_written(zoo: Path, tmp_path: Path, capsys, case: str,
                                                          command: list[str]) -> None:
    """Before: YAML kept the last of a repeated key and dropped the first without a word; the base
    listed as a model gave it a zero task vector (null task-vector features); an empty path read
    as the catalog's folder; `models: []` let `probe` exit 0 having done nothing; a NUL byte was a ValueError traceback; `source:` was dropped silently."""
    text, needle = BAD[case]
    catalog = zoo / "catalog.yaml"
    catalog.write_text(text)
    before = tree_hash(zoo)
    out = tmp_path / "out"
    assert cli_main([*command, "--catalog", str(catalog), "--out", str(out)]) == 2
    one_line_error(capsys, f"{catalog}: ", needle.format(zoo=zoo))
    assert not out.exists()
    assert tree_hash(zoo) == before


def test_a_task_named_by_a_number_names_the_task_key(zoo: Path) -> None:
    """The location read `tasks[1].[key]`, as if `tasks` were a list."""
    (zoo / "catalog.yaml").write_text("models:\n  - {name: a, path: a}\ntasks:\n  1: {probes: p.jsonl}\n")
    with pytest.raises(ConfigError, match=r"catalog.yaml: tasks\.1 \(the name\): a task name must be text, and "
                                          r"YAML read this one as int \(.*quote it\)$"):
        Catalog.load(zoo / "catalog.yaml")


def test_a_probe_file_that_is_a_folder_is_named_as_such(tmp_path: Path) -> None:
    """A task's `probes:` naming a folder was 'probe file not found', for a path that is there."""
    with pytest.raises(ProbeError, match=rf"^{tmp_path}: a folder, not a probe file$"):
        load_probe_texts(tmp_path)


def test_a_catalog_the_testbed_writes_still_loads(zoo: Path) -> None:
    """The checks above refuse nothing the project writes itself (testbed/build.py's to_yaml)."""
    written = Catalog(base=Path("base"), models=[ModelEntry(name="a", path=Path("a"), task="code"),
                                                 ModelEntry(name="b", path=Path("b"), task="math")],
                      tasks={t: TaskEntry(probes=Path("p.jsonl"), eval=Path("e.jsonl")) for t in ("code", "math")})
    (zoo / "catalog.yaml").write_text(written.to_yaml())
    cat = Catalog.load(zoo / "catalog.yaml")
    assert cat.names == ["a", "b"] and cat.base == (zoo / "base").resolve()
    assert cat.tasks["math"].eval == (zoo / "e.jsonl").resolve()


@pytest.mark.parametrize("path", ["~no-such-user-of-simmerge/a", "loop"])
def test_an_unknown_home_or_a_symlink_loop_is_a_missing_path(zoo: Path, path: str) -> None:
    """Path.expanduser (`~user` of no user) and Path.resolve (a symlink loop) raised a RuntimeError:
    a traceback. Now each is a path that does not exist, named by its model."""
    (zoo / "loop").symlink_to(zoo / "loop2")
    (zoo / "loop2").symlink_to(zoo / "loop")
    (zoo / "catalog.yaml").write_text(f"models:\n  - {{name: a, path: a}}\n  - {{name: b, path: {path}}}\n")
    with pytest.raises(ConfigError, match=rf"^{zoo}/catalog.yaml: models\[1\] \(name 'b'\): path {zoo}/{path} "
                                          r"does not exist$"):
        Catalog.load(zoo / "catalog.yaml")
