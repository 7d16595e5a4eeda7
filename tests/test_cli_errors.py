"""User errors are one line and exit 2, with the inputs byte-identical and nothing written:
each case here once printed a traceback (or a useless line) instead."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec, make_family
from input_checks import one_line_error as _one_line_error, tree_hash  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_family(tmp_path_factory.mktemp("models"), SPEC)
    return root



def test_usage_errors_are_one_line(capsys) -> None:
    """argparse printed its whole usage block before the error line."""
    for argv, needle in ((["merge", "x.yaml", "--workers", "0"],
                          "simmerge merge: error: argument --workers: 0 is not at least 1 (see simmerge merge --help)"),
                         (["merge", "x.yaml"], "the following arguments are required: --out"),
                         (["frob"], "simmerge: error: argument COMMAND: invalid choice: 'frob'")):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2
        _one_line_error(capsys, needle)


def test_serve_refuses_a_port_it_cannot_listen_on_before_ray(tmp_path: Path, capsys) -> None:
    """Out of range, or taken: Ray Serve's traceback (exit 1) after Ray had started."""
    import socket

    from simmerge_ray.cli.serve import _check_port_free
    from simmerge_ray.errors import ConfigError

    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--state", str(tmp_path / "state"), "--port", "99999"])
    assert exc.value.code == 2
    _one_line_error(capsys, "argument --port: 99999 is not a port (1-65535)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"--host 127.0.0.1 --port {port}: cannot listen there \(Address already"):
            _check_port_free("127.0.0.1", port)
    _check_port_free("127.0.0.1", port)  # free again
    # the host at fault, not the port (both said "choose another --port")
    with pytest.raises(ConfigError, match=r"^--host 999\.1\.1\.1: not an address of this machine"):
        _check_port_free("999.1.1.1", port)
    with pytest.raises(ConfigError, match=r"cannot listen there \(an address this machine does not have\); "
                                          r"choose another --host$"):
        _check_port_free("192.0.2.1", port)  # TEST-NET-1: routed nowhere, held by no machine


@pytest.mark.parametrize("params, needle", [
    ({"weight": 0.5, "density": "abc"}, "models[0].parameters.density: expected a finite number, got 'abc'"),
    ({"weight": ".nan", "density": 0.5}, "models[0].parameters.weight: expected a finite number, got '.nan'"),
    ({"weight": "0.5", "density": 0.5},
     "models[0].parameters.weight: expected a finite number (this one is quoted: write it without quotes), got '0.5'"),
    ({"weight": 0.5, "density": [0.5, "x"]}, "models[0].parameters.density: expected a finite number, got 'x'"),
    ({"weight": 0.5, "density": 1.5}, "models[0].parameters.density: expected a number in [0.0, 1.0], got 1.5"),
    ({"weight": 0.5, "density": [{"filter": "mlp", "value": -0.1}, {"value": 0.5}]},
     "models[0].parameters.density[0].value: expected a number in [0.0, 1.0], got -0.1"),
    ({"weight": [0.5, True], "density": 0.5}, "models[0].parameters.weight: expected a finite number, got True"),
    # finite in Python, infinite in the float32 the weights are applied in (was a numpy overflow
    # warning, then a non-finite merged tensor)
    ({"weight": 1e300, "density": 0.5},
     "models[0].parameters.weight: expected a number within float32's range (|x| <= 3.4e+38), got 1e+300"),
    ({"weight": 0.5, "denisty": 0.5}, "models[0].parameters: unknown parameter 'denisty' for dare_ties"),
])
def test_bad_parameter_values_are_one_line(models: Path, tmp_path: Path, capsys, params: dict, needle: str) -> None:
    cfg = tmp_path / "dare.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(models / "base"), "models": [
        {"model": str(models / "m1"), "parameters": params},
        {"model": str(models / "m2"), "parameters": {"weight": 0.5, "density": 0.5}}]}))
    before = tree_hash(models)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2  # refused before Ray starts
    _one_line_error(capsys, f"{cfg}: {needle}")
    assert tree_hash(models) == before


def test_a_models_merge_of_different_depths_is_refused_not_truncated(models: Path, tmp_path: Path, capsys) -> None:
    """A `models:` merge of a 3-layer and a 2-layer model used to write a 2-layer model when the
    shallower came first, silently dropping the deeper one's last layer."""
    from dataclasses import replace

    from simmerge_ray.io.synthetic import make_checkpoint

    deep = tmp_path / "deep"
    make_checkpoint(deep, replace(SPEC, num_layers=3, seed=7))
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 0.5},
                                   "models": [{"model": str(models / "m1")}, {"model": str(deep)}]}))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{cfg}: models[1]: model {str(deep)!r} gives 3 layers, model {str(models / 'm1')!r} 2: "
                            "every model of a merge must give the same number (use slices with a layer_range per source)")
    assert not (tmp_path / "out").exists()
    # Another vocabulary size: the error points to the setting that merges it.
    big = tmp_path / "big"
    make_checkpoint(big, replace(SPEC, vocab_size=72, seed=8))
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 0.5},
                                   "models": [{"model": str(models / "m1")}, {"model": str(big)}]}))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "has shape [72, 32]", "(the vocabularies differ: set tokenizer_source: union, base or a "
                                                  "model to lay every model's rows out in one vocabulary)")


@pytest.mark.parametrize("cfg, needle", [
    ({"merge_method": "slerp", "base_model": "m1", "parameters": {"t": -0.5},
      "models": [{"model": "m1"}, {"model": "m2"}]}, "parameters.t: expected a number in [0.0, 1.0], got -0.5"),
    ({"merge_method": "slerp", "base_model": "m1", "parameters": {"t": 0.5}, "slices": [{"sources": [
        {"model": "m1", "layer_range": [0, 40]}, {"model": "m2", "layer_range": [0, 40]}]}]},
     "slices[0].sources[0].layer_range: [0, 40] is beyond the 2 layers of model 'm1'"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [{"sources": [
        {"model": "m1", "layer_range": [0, 1]}, {"model": "m2", "layer_range": [0, 2]}]}]},
     "slices[0]: sources span different numbers of layers ([[0, 1], [0, 2]])"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m1", "layer_range": [1, "2"]}]}]},
     "slices[0].sources[0].layer_range: expected [start, end] with 0 <= start < end, got [1, '2']"),
    ({"merge_method": "ties", "parameters": {"weight": 1.0}, "models": [{"model": "m1"}, {"model": "m2"}]},
     "merge_method 'ties' needs a base_model"),
    ({"merge_method": "ties", "base_model": "base", "parameters": {"weight": 1.0}, "slices": [{"sources": [
        {"model": "m1", "layer_range": [0, 2]}, {"model": "m2", "layer_range": [0, 2]}]}]},
     "slices[0]: base_model 'base' is not among the slice's sources"),
    ({"merge_method": "nearswap", "base_model": "base", "parameters": {"t": 0.1},
      "models": [{"model": "m1"}, {"model": "m2"}]}, "models: merge_method 'nearswap' takes 1 model besides the base, got 2"),
    ({"merge_method": "della", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.2}}]},
     "parameter 'epsilon': density 0.9 +/- epsilon 0.2 must lie in (0, 1)"),
    ({"merge_method": "ties", "base_model": "base", "dtype": "float64", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 0.5}}, {"model": "m2", "parameters": {"weight": 0.5}}]},
     "model.embed_tokens.weight: ties selects magnitudes in float32, bfloat16 or float16, not float64"),
    ({"merge_method": "karcher", "parameters": {"max_iter": 2.5}, "models": [{"model": "m1"}, {"model": "m2"}]},
     "parameters.max_iter: expected an integer, got 2.5"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer_source": "m9",
      "models": [{"model": "m1"}, {"model": "m2"}]}, "tokenizer_source: 'm9' must be 'union', 'base' or one of the models"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer": {"tokens": {"<x>": {"source": "m9"}}},
      "models": [{"model": "m1"}, {"model": "m2"}]}, "tokenizer.tokens.<x>.source: model 'm9' is not one of"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer": {"pad_to_multiple_of": 0},
      "models": [{"model": "m1"}, {"model": "m2"}]}, "tokenizer.pad_to_multiple_of: expected a positive integer, got 0"),
    ({"merge_method": "linear", "parameters": {"weight": 1.0}, "chat_template": "chatmll",
      "models": [{"model": "m1"}, {"model": "m2"}]}, "chat_template: expected 'auto', one of alpaca, chatml"),
])
def test_bad_configs_are_one_line_before_any_read(models: Path, tmp_path: Path, capsys, cfg: dict,
                                                  needle: str) -> None:
    """Layer ranges, tensor names, method contracts and values are checked against the inputs'
    headers before Ray starts: one line naming the file, the key and the value."""
    path = models / f"bad-{len(list(models.glob('bad-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = tree_hash(models)
    assert cli_main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{path}: {needle}")
    assert tree_hash(models) == before and not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()


def _catalog(root: Path, tasks: dict | None = None, base: bool = False) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(exist_ok=True)
    cat = {"models": [{"name": "a", "path": "a", "task": "code"}, {"name": "b", "path": "b", "task": "math"}],
           **({"tasks": tasks} if tasks else {}), **({"base": "base"} if base else {})}
    (root / "catalog.yaml").write_text(yaml.safe_dump(cat))
    return root / "catalog.yaml"


def test_plan_with_a_misspelt_task_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    (tmp_path / "p.jsonl").write_text('"x"\n')
    cat = _catalog(tmp_path, {"code": {"probes": "p.jsonl"}, "math": {"probes": "p.jsonl"}})
    assert cli_main(["plan", "--selector", str(tmp_path / "sel"), "--catalog", str(cat), "--features",
                     str(tmp_path / "feats"), "--task", "coding", "--expert", "a", "--aux", "b",
                     "--out", str(tmp_path / "plan")]) == 2
    _one_line_error(capsys, "no task named 'coding'; known: code, math")
    assert not (tmp_path / "plan").exists()


def test_a_pairwise_plan_refuses_multiway_options(tmp_path: Path, capsys) -> None:
    """`plan --expert --aux` used to accept and ignore --max-way, --aux-weight, --calibration...,
    printing the same result whatever they said."""
    (tmp_path / "p.jsonl").write_text('"x"\n')
    cat = _catalog(tmp_path, {"code": {"probes": "p.jsonl"}, "math": {"probes": "p.jsonl"}})
    assert cli_main(["plan", "--selector", str(tmp_path / "sel"), "--catalog", str(cat), "--features",
                     str(tmp_path / "feats"), "--task", "code", "--expert", "a", "--aux", "b", "--max-way", "3",
                     "--calibration", "c.json", "--out", str(tmp_path / "plan")]) == 2
    _one_line_error(capsys, "--max-way, --calibration: multi-way options (with --models); a pairwise plan (--expert, "
                            "--aux) ranks the arms by the selector alone")
    assert not (tmp_path / "plan").exists()


def test_a_model_whose_task_is_not_declared_is_named(tmp_path: Path, capsys) -> None:
    """A typo in a model's task used to make it silently task-less (features, plan), and `label`
    then blamed a `tasks.<typo>` entry that is not in the file."""
    (tmp_path / "p.jsonl").write_text('"x"\n')
    cat = _catalog(tmp_path, {"code": {"probes": "p.jsonl"}, "maths": {"probes": "p.jsonl"}})
    assert cli_main(["features", "functional", "--catalog", str(cat), "--out", str(tmp_path / "feats")]) == 2
    _one_line_error(capsys, f"{cat}: models[1] (name 'b'): task 'math' is not one of tasks (code, maths)")
    assert not (tmp_path / "feats").exists()


def test_plan_with_a_bad_calibration_file_names_it(tmp_path: Path, capsys) -> None:
    cat = _catalog(tmp_path)
    args = ["plan", "--selector", str(tmp_path / "sel"), "--aux-selector", str(tmp_path / "sel-aux"), "--catalog",
            str(cat), "--features", str(tmp_path / "feats"), "--task", "code", "--models", "a", "b",
            "--out", str(tmp_path / "plan")]
    missing = tmp_path / "calibration.json"
    assert cli_main([*args, "--calibration", str(missing)]) == 2
    _one_line_error(capsys, f"--calibration {missing}: no such file (a pipeline run writes multiway/calibration.json, "
                            "`simmerge calibrate` one from your catalog's labels)")
    missing.write_text('{"sizes": {}}')
    assert cli_main([*args, "--calibration", str(missing)]) == 2
    _one_line_error(capsys, f"{missing}: not a multi-way calibration file ('features')")
    assert not (tmp_path / "plan").exists() and missing.read_text() == '{"sizes": {}}'


def _multiway_labels(path: Path, **columns) -> None:
    import polars as pl

    row = {"models": [["a", "b", "c"]], "operators": [["linear", "ties"]], "weighting": ["equal"], "k": [3],
           "retention": ['{"a": -0.2, "b": -0.5, "c": -0.4}']}
    pl.DataFrame({**row, **columns}).write_parquet(path)


def test_calibrate_names_what_is_wrong_with_its_labels(tmp_path: Path, capsys) -> None:
    """simmerge calibrate reads `simmerge label`'s multi-way table: each way it can be wrong is one
    line naming the file (and the row), before any selector is read or anything is written; a row
    that is no plan never reaches the planner (its errors named neither file nor row, or tracebacks)."""
    import polars as pl

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"name": m, "path": m, "task": t}
                                              for m, t in (("a", "code"), ("b", "math"), ("c", "rag"))]}))
    (tmp_path / "feats").mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    args = ["calibrate", "--selector", str(tmp_path / "sel"), "--aux-selector", str(tmp_path / "sel-aux"),
            "--features", str(tmp_path / "feats"), "--labels", str(labels), "--catalog", str(cat),
            "--out", str(tmp_path / "cal")]
    given = [*args[:-6], "--labels"], args[-4:]
    table = labels / "labels_multiway.parquet"
    assert cli_main(args) == 2
    _one_line_error(capsys, f"--labels {labels}: no labels_multiway.parquet there (`simmerge label --out DIR` writes")
    table.write_text("not parquet")
    assert cli_main(args) == 2
    _one_line_error(capsys, f"{table}: unreadable as a parquet table")
    pl.DataFrame({"models": [["a", "b"]], "k": [2]}).write_parquet(table)
    assert cli_main(args) == 2
    _one_line_error(capsys, f"{table}: no column 'operators', 'weighting', 'retention': not a table `simmerge label` wrote")
    _multiway_labels(table)
    pairwise = labels / "labels.parquet"
    pairwise.write_bytes(table.read_bytes())
    assert cli_main([*given[0], str(pairwise), *given[1]]) == 2
    _one_line_error(capsys, f"--labels {pairwise}: the pairwise labels; give label's folder or its labels_multiway.parquet")
    for columns, needle in (
            ({"k": ["3"]}, "column 'k' holds String, not what `simmerge label` writes"),
            ({"k": [2]}, "no 3- or 4-way merge measured"),
            ({"models": [["a", "b", "d"]]}, "row 0: model 'd' is not in the catalog (labels of another catalog?)"),
            ({"models": [["a", "b", "a"]]}, "row 0: models ['a', 'b', 'a'] are not k = 3 distinct names"),
            ({"models": [["a", "b", "c", "a"]]}, "row 0: models ['a', 'b', 'c', 'a'] are not k = 3 distinct names"),
            ({"operators": [["linear"]]}, "row 0: operators ['linear'] are not 2 known arms"),
            ({"operators": [["linear", "foo"]]}, "row 0: operators ['linear', 'foo'] are not 2 known arms"),
            ({"weighting": ["bogus"]}, "row 0: unknown weighting 'bogus'; known: half, equal, anchor"),
            ({"retention": ['{"a": "high", "b": 0, "c": 0}']}, "row 0: retention is not a JSON object of a finite"),
            ({"retention": ['{"zz": 0.1}']}, "row 0: retention is not a JSON object of a finite"),
            ({"retention": ['{"a": true, "b": 0, "c": 0}']}, "row 0: retention is not a JSON object of a finite"),
            ({"retention": ['{"a": null, "b": null, "c": null}']}, "no retention measured in any multi-way row"),
    ):
        _multiway_labels(table, **columns)
        assert cli_main(args) == 2
        _one_line_error(capsys, f"{table}: {needle}")
    assert not (tmp_path / "cal").exists()


def test_fit_on_a_folder_without_features_says_what_is_missing(tmp_path: Path, capsys) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    (tmp_path / "labels.parquet").write_bytes(b"")
    assert cli_main(["fit", "--features", str(feats), "--labels", str(tmp_path / "labels.parquet"),
                     "--out", str(tmp_path / "sel")]) == 2
    _one_line_error(capsys, f"{feats}: no features.parquet in this folder", "simmerge features structural")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats", "labels.parquet"]


def test_fit_on_an_unreadable_label_table_names_it(tmp_path: Path, capsys) -> None:
    import polars as pl

    feats = tmp_path / "features.parquet"
    pl.DataFrame({"a": ["x"], "b": ["y"], "task": ["t"]}).write_parquet(feats)
    (tmp_path / "labels.parquet").write_bytes(b"PAR1 not really")
    assert cli_main(["fit", "--features", str(feats), "--labels", str(tmp_path / "labels.parquet"),
                     "--out", str(tmp_path / "sel")]) == 2
    _one_line_error(capsys, f"{tmp_path / 'labels.parquet'}: unreadable labels")


def test_first_line_keeps_one_line_of_any_error() -> None:
    from simmerge_ray.errors import first_line

    assert first_line(ValueError("\n  bad value\nat line 3\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # an empty message: the type, never an IndexError
    assert first_line(OSError(""), fallback="") == ""
    assert first_line(RuntimeError("x" * 500), limit=10) == "x" * 10 + "..."
    # transformers' config validation puts the reason on the line after a colon
    assert first_line(TypeError("Validation error for field 'vocab_size':\n    TypeError: expected int, got str")) \
        == "Validation error for field 'vocab_size': TypeError: expected int, got str"


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "q", "answer": "a"}\nnot json\n', "line 2: expected a JSON object with 'prompt' and 'answer'"),
    ('{"prompt": "q", "answer": 7}\n', "example 1: 'prompt' and 'answer' must be non-empty strings"),
    (b"\xff\xfe\x00binary", "cannot read the eval set of task 'math'"),
    (None, "no such file (the eval set of task 'math', the catalog's tasks.math.eval)"),  # was a raw errno line
])
def test_label_checks_eval_files_before_ray_starts(tmp_path: Path, capsys, content, needle: str) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "good.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    cat = _catalog(tmp_path, {"code": {"eval": "good.jsonl"}, "math": {"eval": "bad.jsonl"}}, base=True)
    before = tree_hash(tmp_path)
    assert cli_main(["label", "--catalog", str(cat), "--out", str(tmp_path / "labels")]) == 2
    _one_line_error(capsys, str(bad), needle)
    assert tree_hash(tmp_path) == before


class _RunsCode:
    """A pickle payload that would create a file when unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_convert_loads_pickles_with_weights_only(models: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(models / "m1" / "config.json", src / "config.json")
    marker = tmp_path / "pwned"
    state = {n: Checkpoint.open(models / "m1").read(n) for n in Checkpoint.open(models / "m1").tensor_names}
    torch.save({**state, "evil": _RunsCode(marker)}, src / "pytorch_model.bin")
    before = tree_hash(src)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 2
    _one_line_error(capsys, f"{src / 'pytorch_model.bin'}: not a plain tensor checkpoint, refused")
    assert not marker.exists() and not (tmp_path / "conv").exists()
    assert tree_hash(src) == before
    torch.save({**state, "__metadata__": torch.ones(1)}, src / "pytorch_model.bin")
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 2
    _one_line_error(capsys, f"{src / 'pytorch_model.bin'}: a tensor named '__metadata__' cannot be stored")
    torch.save(state, src / "pytorch_model.bin")  # plain tensors convert as before
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 0
    conv = Checkpoint.open(tmp_path / "conv")
    assert all(torch.equal(conv.read(n), t) for n, t in state.items())
    # The legacy (pre-zip) torch.save format is a plain tensor checkpoint too.
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv-legacy"), "--allow-pickle"]) == 0
    legacy = Checkpoint.open(tmp_path / "conv-legacy")
    assert all(torch.equal(legacy.read(n), t) for n, t in state.items())


def test_merge_of_a_pickle_checkpoint_points_to_convert(models: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    torch.save({"w": torch.ones(2)}, src / "pytorch_model.bin")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": str(src), "parameters": {"weight": 1}}, {"model": str(models / "m1"), "parameters": {"weight": 1}}]}))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys, f"simmerge convert {src} --out DIR --allow-pickle")
    assert "or pass --allow-pickle" not in err


def test_label_says_which_models_and_tasks_it_leaves_out(tmp_path: Path, capsys) -> None:
    """A task-less model and a task without an expert are left out of the labels, said in one line
    (here before the output check refuses --out inside the catalog's model folder)."""
    (tmp_path / "base").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "good.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    cat = _catalog(tmp_path, {"code": {"eval": "good.jsonl"}, "math": {"eval": "good.jsonl"},
                              "rag": {"eval": "good.jsonl"}}, base=True)
    raw = yaml.safe_load(cat.read_text())
    raw["models"].append({"name": "chat", "path": "c"})
    cat.write_text(yaml.safe_dump(raw))
    assert cli_main(["label", "--catalog", str(cat), "--out", str(tmp_path / "a" / "labels")]) == 2
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == ["label: left out, as a merge is judged on both models' tasks: models "
                                            "without a task (chat); tasks without an expert (rag)"]
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err


def test_label_names_an_expert_that_does_not_match_the_base_before_ray(models: Path, tmp_path: Path, capsys) -> None:
    """A deeper expert (or another vocabulary, a tied head) used to surface as an actor's
    load_state_dict traceback after Ray started; a PEFT adapter folder is named as one."""
    from dataclasses import replace

    from simmerge_ray.io.synthetic import make_checkpoint

    make_checkpoint(tmp_path / "deep", replace(SPEC, num_layers=3, seed=7))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # named as an adapter before any header is read
    (tmp_path / "good.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    for other, needle in ((tmp_path / "deep", "model 'b' ("), (adapter, "a PEFT adapter (adapter_config.json), not a model")):
        cat = tmp_path / "catalog.yaml"
        cat.write_text(yaml.safe_dump({"base": str(models / "base"), "models": [
            {"name": "a", "path": str(models / "m1"), "task": "code"}, {"name": "b", "path": str(other), "task": "math"}],
            "tasks": {"code": {"eval": "good.jsonl"}, "math": {"eval": "good.jsonl"}}}))
        before = tree_hash(models)
        assert cli_main(["label", "--catalog", str(cat), "--out", str(tmp_path / "labels")]) == 2
        _one_line_error(capsys, needle)
        assert tree_hash(models) == before and not (tmp_path / "labels" / "cache").exists()
    capsys.readouterr()


def test_label_refuses_an_unknown_weighting_before_reading_anything(tmp_path: Path, capsys) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "good.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    cat = _catalog(tmp_path, {"code": {"eval": "good.jsonl"}, "math": {"eval": "good.jsonl"}}, base=True)
    before = tree_hash(tmp_path)
    assert cli_main(["label", "--catalog", str(cat), "--out", str(tmp_path / "labels"),
                     "--weightings", "half", "thirds"]) == 2
    _one_line_error(capsys, "--weightings", "unknown weighting 'thirds'; known: half, equal, anchor")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("case", ["config-not-utf8", "config-is-a-folder", "plan-is-a-folder", "plan-models-mapping",
                                  "plan-not-an-object"])
def test_unreadable_configs_and_plans_are_one_line(models: Path, tmp_path: Path, capsys, case: str) -> None:
    """A merge config or plan file that is a folder, not text, or the wrong JSON shape."""
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"base": str(models / "base"), "models": [
        {"name": "m1", "path": str(models / "m1")}, {"name": "m2", "path": str(models / "m2")}]}))
    bad = tmp_path / "bad"
    if case == "config-not-utf8":
        bad = tmp_path / "bad.yaml"
        bad.write_bytes(b"merge_method: linear\n\xff\xfe")
        argv, needle = ["merge", str(bad)], f"{bad}: not a merge config (not UTF-8 text)"
    elif case == "config-is-a-folder":
        bad.mkdir()
        argv, needle = ["merge", str(bad)], f"{bad}: a folder, not a merge config file"
    elif case == "plan-is-a-folder":
        bad.mkdir()
        argv, needle = ["merge", "--plan", str(bad), "--catalog", str(cat)], f"{bad}: a folder, not a plan file"
    else:
        bad = tmp_path / "plan.json"
        bad.write_text(json.dumps({"task": "code", "models": {"m1": 1, "m2": 2}, "operators": ["linear"]})
                       if case == "plan-models-mapping" else "[1, 2]")
        argv = ["merge", "--plan", str(bad), "--catalog", str(cat)]
        needle = (f"{bad}: models: expected a list of names" if case == "plan-models-mapping"
                  else f"{bad}: not a plan file (expected a JSON object, got list)")
    before = tree_hash(models)
    assert cli_main([*argv, "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, needle)
    assert tree_hash(models) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, needle", [
    ([1, 2], "config.json: expected a JSON object, got list"),
    ({"num_hidden_layers": "two"}, "config.json: num_hidden_layers: expected a whole number, got 'two'"),
    ({"num_hidden_layers": 5}, "config.json: declares 5 layers but the tensors hold blocks 0-1 only"),
    (None, "config.json: cannot read (Is a directory)"),
])
def test_a_bad_model_config_json_is_one_line(models: Path, tmp_path: Path, capsys, config, needle: str) -> None:
    m2 = tmp_path / "m2"
    shutil.copytree(models / "m2", m2)
    if config is None:  # a folder where the file should be
        (m2 / "config.json").unlink()
        (m2 / "config.json").mkdir()
    else:
        (m2 / "config.json").write_text(json.dumps(config))
    cfg = tmp_path / "lin.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(models / "m1"), "parameters": {"weight": 1}}, {"model": str(m2), "parameters": {"weight": 1}}]}))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{m2 / needle}")
    assert not (tmp_path / "out").exists()


def test_plan_with_an_unreadable_feature_table_names_it(tmp_path: Path, capsys) -> None:
    cat = _catalog(tmp_path)
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "features.parquet").write_text("not parquet")
    args = ["plan", "--selector", str(tmp_path / "sel"), "--catalog", str(cat), "--features", str(tmp_path / "feats"),
            "--task", "code", "--out", str(tmp_path / "plan")]
    assert cli_main([*args, "--models", "a", "b"]) == 2
    _one_line_error(capsys, f"{tmp_path / 'feats' / 'features.parquet'}: unreadable feature table")
    assert not (tmp_path / "plan").exists()


def _pair_tables(tmp_path: Path, utility: list) -> tuple[Path, Path]:
    """A feature table and a label table over three model pairs (two arms each)."""
    import polars as pl

    pairs = [("x", "y"), ("y", "z"), ("x", "z")]
    feats = tmp_path / "features.parquet"
    pl.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs], "task": ["t"] * 3,
                  "s_cos": [0.1, 0.5, 0.9]}).write_parquet(feats)
    labels = tmp_path / "labels.parquet"
    pl.DataFrame({"task": ["t"] * 6, "expert": [a for a, _ in pairs for _ in (0, 1)],
                  "aux": [b for _, b in pairs for _ in (0, 1)], "operator": ["linear", "ties"] * 3,
                  "utility": utility}, strict=False).write_parquet(labels)
    return feats, labels


@pytest.mark.parametrize("utility, needle", [
    ([0.1, float("nan"), 0.3, 0.4, 0.5, 0.6], "column 'utility': nan is not a finite number (1 rows; first: task 't', "
                                              "expert 'x', aux 'y', operator 'ties')"),
    (["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"], "column 'utility' holds String, not numbers"),
])
def test_fit_refuses_labels_that_are_not_finite_numbers(tmp_path: Path, capsys, utility: list, needle: str) -> None:
    """A NaN utility used to train a selector of NaN weights and report success."""
    feats, labels = _pair_tables(tmp_path, utility)
    assert cli_main(["fit", "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "sel")]) == 2
    _one_line_error(capsys, f"{labels}: {needle}")
    assert not (tmp_path / "sel").exists()


def test_bandit_init_refuses_a_utility_stored_as_text(tmp_path: Path, capsys) -> None:
    """The bandit cast "0.5" to a number where fit refused it: both now refuse it, naming file and column."""
    feats, labels = _pair_tables(tmp_path, ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"])
    assert cli_main(["bandit-init", "--state", str(tmp_path / "state"), "--features", str(feats),
                     "--labels", str(labels)]) == 2
    _one_line_error(capsys, f"{labels}: column 'utility' holds String, not numbers")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("command", ["fit", "bandit-init"])
def test_labels_of_a_pair_without_features_are_refused_by_fit_and_the_bandit_alike(tmp_path: Path, capsys,
                                                                                   command: str) -> None:
    """Dropping them would learn from part of the labels without a word; one check serves both."""
    import polars as pl

    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    pl.read_parquet(feats).filter(pl.col("a") != "y").write_parquet(feats)
    out = ["--out", str(tmp_path / "out"), "--tune-samples", "0"] if command == "fit" else ["--state", str(tmp_path / "out")]
    assert cli_main([command, "--features", str(feats), "--labels", str(labels), *out]) == 2
    _one_line_error(capsys, f"{feats}: no row for 1 labelled (task, expert, aux), e.g. ('t', 'y', 'z'); "
                            f"measure features for every labelled pair, or drop those labels")
    assert not (tmp_path / "out").exists()


def _null_b(df):
    import polars as pl

    return pl.concat([df, df.head(1).with_columns(pl.lit(None, pl.String).alias("b"))])


def _inf_feature(df):
    import polars as pl

    return df.with_columns(s_cos=pl.Series([0.1, float("-inf"), 0.9]))


def _two_rows(df):
    import polars as pl

    return pl.concat([df, df.head(2).with_columns(pl.col("s_cos") * 2)])


@pytest.mark.parametrize("damage, needle", [
    # a null key joined nothing: its row was dropped without a word
    (_null_b, "column 'b' is null in 1 row(s); every row names its a, b and task"),
    # an infinite feature made every prediction from its row NaN without a word
    (_inf_feature, "column 's_cos' is -inf in 1 row(s) (first: a 'y', b 'z', task 't')"),
    # two rows for one (a, b, task): readers took the first (plan) or joined both (fit) without a word
    (_two_rows, "2 (a, b, task) key(s) appear in more than one row (first: a 'x', b 'y', task 't', 2 rows)"),
])
def test_fit_refuses_a_damaged_feature_table_naming_the_row(tmp_path: Path, capsys, damage, needle: str) -> None:
    import polars as pl

    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    damage(pl.read_parquet(feats)).write_parquet(feats)
    assert cli_main(["fit", "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "sel"),
                     "--tune-samples", "0"]) == 2
    _one_line_error(capsys, f"{feats}: {needle}")
    assert not (tmp_path / "sel").exists()


def test_fit_reads_model_and_task_names_stored_as_categoricals(tmp_path: Path, capsys, ray_cluster) -> None:
    """Names written as Categorical (pandas and polars users often do) passed the feature table's
    read and were then refused by fit's own checks: read as the strings they are."""
    import polars as pl

    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    for path, keys in ((feats, ("a", "b", "task")), (labels, ("task", "expert", "aux", "operator"))):
        pl.read_parquet(path).with_columns(pl.col(keys).cast(pl.Categorical)).write_parquet(path)
    assert cli_main(["fit", "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "sel"),
                     "--tune-samples", "0", "--epochs", "2"]) == 0, capsys.readouterr().err
    assert (tmp_path / "sel" / "selector.json").is_file()


def test_selector_commands_refuse_bad_fold_and_member_counts(tmp_path: Path, capsys) -> None:
    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    for folds in ("0", "1", "-3"):  # typed as demo's and transfer's --folds
        with pytest.raises(SystemExit) as exc:
            cli_main(["evaluate-selector", "--features", str(feats), "--labels", str(labels), "--out",
                      str(tmp_path / "ev"), "--folds", folds, "--tune-samples", "0"])
        assert exc.value.code == 2
        _one_line_error(capsys, f"argument --folds: {folds} is not at least 2")
    for command in ("fit", "evaluate-selector"):
        assert cli_main([command, "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "ev"),
                         "--members", "0", "--tune-samples", "0"]) == 2
        _one_line_error(capsys, "--members: 0 is not at least 1 (networks averaged into the selector)")
    assert not (tmp_path / "ev").exists()


def _edit_schema(folder: Path, field: str, value: object) -> None:
    raw = json.loads((folder / "selector.json").read_text())
    raw[field][0] = value
    (folder / "selector.json").write_text(json.dumps(raw))


def _nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "selector.safetensors")
    state["body.0.bias"][1] = float("nan")
    save_file(state, folder / "selector.safetensors")


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "selector.json").write_text('{"config": '), "unreadable selector (JSONDecodeError"),
    (lambda d: (d / "selector.json").write_text("[]"), "not a selector's schema or weights (TypeError"),
    (lambda d: (d / "selector.json").write_text((d / "selector.json").read_text().replace('"mean":', '"mean_":')),
     "not a selector's schema or weights (KeyError"),
    (lambda d: (d / "selector.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "unreadable selector (SafetensorError"),
    (lambda d: (d / "selector.safetensors").unlink(),  # was "(None missing)"
     "{sel}: not a selector folder ({sel}/selector.safetensors missing)"),
    (lambda d: (d / "selector.json").write_text((d / "selector.json").read_text().replace('"hidden": 64', '"hidden": 32')),
     "not a selector's schema or weights (RuntimeError"),
    (lambda d: (d / "selector.json").write_text((d / "selector.json").read_text().replace('"members": 1', '"members": 0')),
     "not a selector's schema or weights (ConfigError: selector config: members must be an integer >= 1, got 0)"),
    # read, then every prediction and every plan score NaN, exit 0
    (lambda d: _edit_schema(d, "scale", 0.0), "selector.json: scale[0] is 0.0, not a finite number > 0"),
    (lambda d: _edit_schema(d, "mean", float("nan")), "selector.json: mean[0] is nan, not a finite number"),
    # numpy read them as 1.0 and 0.5: a hand edit taken for a number
    (lambda d: _edit_schema(d, "scale", True), "(ConfigError: scale[0] is True, not a number)"),
    (lambda d: _edit_schema(d, "mean", "0.5"), "(ConfigError: mean[0] is '0.5', not a number)"),
    (lambda d: _nan_weight(d), "selector.safetensors: tensor 'body.0.bias' holds NaN or Inf values"),
])
def test_a_damaged_selector_folder_is_one_line(tmp_path: Path, capsys, damage, needle: str) -> None:
    from simmerge_ray.selector.data import build_pair_data
    from simmerge_ray.selector.model import SelectorConfig
    from simmerge_ray.selector.train import fit_selector
    import polars as pl

    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    sel = fit_selector(build_pair_data(pl.read_parquet(labels), pl.read_parquet(feats)), SelectorConfig(epochs=2))
    sel.save(tmp_path / "sel")
    damage(tmp_path / "sel")
    cat = _catalog(tmp_path)
    (tmp_path / "feats").mkdir()  # a features folder of its own (--features FILE stands for its folder)
    feats = feats.rename(tmp_path / "feats" / "features.parquet")
    assert cli_main(["plan", "--selector", str(tmp_path / "sel"), "--catalog", str(cat), "--features", str(feats),
                     "--task", "t", "--expert", "a", "--aux", "b", "--out", str(tmp_path / "plan")]) == 2
    _one_line_error(capsys, f"{tmp_path / 'sel'}", needle.format(sel=tmp_path / "sel"))


def test_fit_names_a_key_column_of_the_wrong_type(tmp_path: Path, capsys) -> None:
    import polars as pl

    feats, labels = _pair_tables(tmp_path, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    pl.read_parquet(feats).with_columns(pl.Series("a", [1, 2, 3])).write_parquet(feats)
    assert cli_main(["fit", "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "sel")]) == 2
    _one_line_error(capsys, f"{feats}: column 'a' holds Int64, not names")


def test_invalid_yaml_is_one_line_naming_the_file_line_and_column(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n  parameters: {weight: 1}\n")
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"{cfg}: invalid YAML at line 4, column 3: while parsing a block collection: expected "
                            "<block end>, but found '?'")
    assert not (tmp_path / "out").exists()
