"""Careless input to `simmerge features` and `simmerge convert`: two catalog models of different
architectures, task names that cannot be table keys, an empty path given as an option, a convert
source that is not (only) a .bin checkpoint, a garbage .bin, a model folder without config.json.
Each is one line naming the file, field or model at fault, refused before Ray starts or any
tensor is read; nothing is written and the inputs are unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.synthetic import SyntheticSpec, make_family
from input_checks import one_line_error, tree_hash  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real safetensors checkpoints: base, m1, m2 (never changed by a test: copied first)."""
    return make_family(tmp_path_factory.mktemp("family"), SPEC)


def _copy(family: Path, src: str, dst: Path) -> Path:
    shutil.copytree(family / src, dst)
    return dst


def _catalog(root: Path, entries: list[tuple[str, Path]], base: Path | None = None, extra: str = "") -> Path:
    path = root / "catalog.yaml"
    path.write_text((f"base: {base}\n" if base else "") + "models:\n"
                    + "".join(f"  - {{name: {n}, path: {p}}}\n" for n, p in entries) + extra)
    return path


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    assert cli_main(argv) == 2
    return one_line_error(capsys, *needles)


@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "with base"])
def test_two_models_of_different_architectures_are_refused_before_any_read(family: Path, tmp_path: Path, capsys,
                                                                           no_ray: None, with_base: bool) -> None:
    """Same tensor names and shapes, another model_type: only the base was compared with the
    first model, so a mistral beside a llama was compared as one (exit 0, features written)."""
    other = _copy(family, "m2", tmp_path / "mis")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral",
                                                   "architectures": ["MistralForCausalLM"]}))
    catalog = _catalog(tmp_path, [("a", family / "m1"), ("mis", other)], family / "base" if with_base else None)
    before, out = tree_hash(family), tmp_path / "feats"
    _refused(capsys, ["features", "structural", "--catalog", str(catalog), "--out", str(out)],
             f"model 'mis' ({other}) is a 'mistral' checkpoint but model 'a' ({family / 'm1'}) is 'llama'")
    assert not out.exists() and tree_hash(family) == before


TASK_CASES = {
    "an empty task name": ("tasks:\n  '': {probes: p.jsonl}\n", "tasks.'' (the name): Value error, must be non-empty"),
    "a task name with a space": ("tasks:\n  'a b': {probes: p.jsonl}\n", "tasks.'a b' (the name): Value error"),
    "a task name with a slash": ("tasks:\n  a/b: {probes: p.jsonl}\n", "tasks.'a/b' (the name): Value error"),
    "a task YAML reads as true": ("tasks:\n  yes: {probes: p.jsonl}\n", "tasks.True (the name): a task name must "
                                                                       "be text, and YAML read this one as bool"),
}


@pytest.mark.parametrize("case", TASK_CASES)
def test_task_names_are_checked_as_model_names(tmp_path: Path, capsys, no_ray: None, case: str) -> None:
    """Task names key every feature and label table; '', 'a b' and 'a/b' were taken, and `yes:`
    was named `tasks.1`, a task the file does not have."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n')
    text, needle = TASK_CASES[case]
    catalog = _catalog(tmp_path, [("a", tmp_path / "a"), ("b", tmp_path / "b")], extra=text)
    _refused(capsys, ["features", "functional", "--catalog", str(catalog), "--out", str(tmp_path / "o")],
             f"{catalog}: {needle}")
    assert not (tmp_path / "o").exists()


def test_a_models_empty_task_is_refused(tmp_path: Path) -> None:
    """`task: ''` without a `tasks:` block was kept as the model's task."""
    (tmp_path / "a").mkdir()
    (tmp_path / "catalog.yaml").write_text(f"models:\n  - {{name: a, path: {tmp_path / 'a'}, task: ''}}\n")
    with pytest.raises(ConfigError, match=r"models\[0\] \(name 'a'\)\.task: Value error, must be non-empty"):
        Catalog.load(tmp_path / "catalog.yaml")


def test_a_catalog_that_is_a_folder_is_named_once(tmp_path: Path) -> None:
    """The message read 'a folder, not a catalog file file'."""
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: a folder, not a catalog file$"):
        Catalog.load(tmp_path)


EMPTY = {
    "structural --out": ["features", "structural", "--catalog", "{catalog}", "--out", ""],
    "structural --catalog": ["features", "structural", "--catalog", "", "--out", "o"],
    "functional --out": ["features", "functional", "--catalog", "{catalog}", "--out", ""],
    "convert src": ["convert", "", "--out", "o", "--allow-pickle"],
    "convert --out": ["convert", "{model}", "--out", "", "--allow-pickle"],
    # every command's options go through the one parser: a sample of the others
    "merge --out": ["merge", "{catalog}", "--out", " ", "--overwrite"],
    "label --catalog": ["label", "--catalog", "", "--out", "o"],
    "fit --features": ["fit", "--features", "", "--labels", "l.parquet", "--out", "o"],
    "plan --task": ["plan", "--selector", "s", "--catalog", "{catalog}", "--features", "f", "--task", "",
                    "--expert", "a", "--aux", "b", "--out", "o"],
    "serve --state": ["serve", "--state", "", "--features", "f"],
    "zoo build --config": ["zoo", "build", "--config", "", "--out", "o"],
}


@pytest.mark.parametrize("case", EMPTY)
def test_an_empty_path_option_is_refused(family: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
                                         no_ray: None, case: str) -> None:
    """`Path("")` is the current folder: `features structural --out ""` wrote its five files
    among the user's own there, and `convert ""` converted whatever the current folder held; the
    other commands said "." in their errors (fit: "run ... with --out . first")."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "notes.txt").write_text("the user's")
    before = tree_hash(work)
    monkeypatch.chdir(work)
    catalog = _catalog(tmp_path, [("a", family / "m1"), ("b", family / "m2")],
                       extra=f"tasks:\n  code: {{probes: {tmp_path / 'p.jsonl'}}}\n")
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n')
    argv = [a.format(catalog=catalog, model=family / "m1") for a in EMPTY[case]]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    flag = case.split()[-1]
    one_line_error(capsys, f"argument {flag}: an empty value")
    assert tree_hash(work) == before


def _bin_folder(family: Path, dst: Path, *, safetensors_too: bool = False, raw: bytes | None = None) -> Path:
    """A pytorch_model.bin folder of m1's tensors (or `raw` bytes), optionally beside m1's safetensors."""
    (_copy(family, "m1", dst) if safetensors_too else dst).mkdir(exist_ok=True)
    shutil.copy(family / "m1" / "config.json", dst / "config.json")
    if raw is not None:
        (dst / "pytorch_model.bin").write_bytes(raw)
    else:
        state = {}
        for shard in sorted((family / "m1").glob("*.safetensors")):
            state.update(load_file(shard))
        torch.save(state, dst / "pytorch_model.bin")
    return dst


CONVERT = {
    "only safetensors": ("no pytorch_model*.bin to convert (it holds model.safetensors.index.json: already "
                         "safetensors, use it as it is)"),
    "both formats": "holds safetensors weights (model.safetensors.index.json) beside the .bin",
    "a garbage .bin": "pytorch_model.bin: not a plain tensor checkpoint, refused: corrupt, truncated, or pickling "
                      "objects other than tensors (KeyError: ",
}


@pytest.mark.parametrize("case", CONVERT)
def test_convert_reads_only_a_bin_and_names_a_bad_one(family: Path, tmp_path: Path, capsys, case: str) -> None:
    """A folder holding safetensors was 'converted' from them (the .bin beside them ignored,
    or a safetensors-only folder copied, exit 0); a garbage .bin was 'refused (101)'."""
    if case == "only safetensors":
        src = _copy(family, "m1", tmp_path / "src")
    else:
        src = _bin_folder(family, tmp_path / "src", safetensors_too=case == "both formats",
                          raw=b"hello world" * 10 if case == "a garbage .bin" else None)
    before, out = tree_hash(src), tmp_path / "conv"
    _refused(capsys, ["convert", str(src), "--out", str(out), "--allow-pickle"], f"{src}", CONVERT[case])
    assert not out.exists() and tree_hash(src) == before


def test_a_bin_folder_converts_and_a_model_without_config_is_named(family: Path, tmp_path: Path, capsys,
                                                                    no_ray: None) -> None:
    """The refusals above leave a plain .bin folder converting; a model folder without config.json
    beside models that have one was named by `.../config.json`, a file that is not there."""
    src = _bin_folder(family, tmp_path / "src")
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 0
    capsys.readouterr()
    bare = _copy(family, "m1", tmp_path / "bare")
    (bare / "config.json").unlink()
    catalog = _catalog(tmp_path, [("bare", bare), ("b", family / "m2")])
    _refused(capsys, ["features", "structural", "--catalog", str(catalog), "--out", str(tmp_path / "o")],
             f"model 'bare' ({bare}: no config.json): no vocab_size, beside models that state one (")
