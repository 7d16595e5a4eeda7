"""Unusual inputs to `simmerge convert` and `simmerge merge` as a new user gives them: each is one
line (exit 2) naming the file, shard or tensor at fault, writes nothing and leaves the inputs as
they were. Each case here was once converted or merged silently wrong, or a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from simmerge_ray.cli import main as cli_main
from input_checks import one_line_error as _one_line_error, tree_hash  # beside this file

A, B = torch.arange(12.0).reshape(4, 3), torch.arange(5.0)




def _index(src: Path, weight_map: dict[str, str]) -> None:
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


S1, S2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"


def _missing_shard_indexed(src: Path) -> None:
    torch.save({"a": A}, src / S1)
    _index(src, {"a": S1, "b": S2})


def _missing_shard_no_index(src: Path) -> None:
    torch.save({"a": A}, src / S1)


def _index_names_absent_tensor(src: Path) -> None:
    torch.save({"a": A}, src / S1)
    torch.save({"b": B}, src / S2)
    _index(src, {"a": S1, "b": S2, "c": S2})


def _same_tensor_in_two_shards(src: Path) -> None:
    torch.save({"a": A}, src / S1)
    torch.save({"a": A + 1, "b": B}, src / S2)


def _bin_beside_shards(src: Path) -> None:
    torch.save({"a": A}, src / "pytorch_model.bin")
    torch.save({"a": A * 2}, src / "pytorch_model-00001-of-00001.bin")


@pytest.mark.parametrize("make, needles", [
    (_missing_shard_indexed, [f"shard {S2} listed in pytorch_model.bin.index.json is missing"]),
    (_missing_shard_no_index, [f"shard {S2} is missing (1 of the 2 pytorch_model-*-of-00002.bin shards)"]),
    (_index_names_absent_tensor, [f"tensor 'c' is listed in pytorch_model.bin.index.json under {S2} but absent"]),
    (_same_tensor_in_two_shards, [f"tensor 'a' appears in two shards ({S1} and {S2})"]),
    (_bin_beside_shards, ["tensor 'a' appears in two shards (pytorch_model-00001-of-00001.bin and pytorch_model.bin)"]),
    (lambda src: torch.save({}, src / "pytorch_model.bin"), ["the .bin checkpoint holds no tensors"]),
    (lambda src: torch.save({1: A}, src / "pytorch_model.bin"),
     ["pytorch_model.bin: entry 1 is named by int, not by a string"]),
    (lambda src: torch.save({"a": A.to_sparse()}, src / "pytorch_model.bin"),
     ["pytorch_model.bin: entry 'a' is a torch.sparse_coo tensor; only dense tensors"]),
    (lambda src: torch.save({"a": torch.empty(3, device="meta")}, src / "pytorch_model.bin"),
     ["pytorch_model.bin: entry 'a' is a meta tensor (no data)"]),
])
def test_convert_refuses_an_incomplete_or_ambiguous_bin_checkpoint(tmp_path: Path, capsys,
                                                                    make: Callable[[Path], None],
                                                                    needles: list[str]) -> None:
    """A missing shard or a tensor the index promises was converted into a model short of those
    tensors (exit 0); a tensor in two shards kept the later copy; an empty .bin gave an empty
    model; an int-named entry became a tensor '1'; sparse and meta tensors were tracebacks."""
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    make(src)
    before = tree_hash(src)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 2
    _one_line_error(capsys, *needles)
    assert not (tmp_path / "conv").exists() and tree_hash(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # no temporary folder left


def test_convert_of_a_complete_indexed_bin_checkpoint_reads_the_index_shards(tmp_path: Path) -> None:
    """Shards are the index's: a stray .bin the index does not name is not read (as transformers);
    shared-storage, non-contiguous and zero-size tensors convert with their values."""
    from simmerge_ray.io.checkpoint import Checkpoint

    src = tmp_path / "bin"
    src.mkdir()
    state = {"a": A, "tied": A, "t": A.t(), "z": torch.zeros(0, 3)}
    torch.save({k: state[k] for k in ("a", "tied")}, src / S1)
    torch.save({k: state[k] for k in ("t", "z")}, src / S2)
    torch.save({"a": A + 7}, src / "pytorch_model-old.bin")
    _index(src, {"a": S1, "tied": S1, "t": S2, "z": S2})
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 0
    conv = Checkpoint.open(tmp_path / "conv")
    assert sorted(conv.tensor_names) == sorted(state)
    assert all(torch.equal(conv.read(n), t) for n, t in state.items())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simmerge_ray.io.synthetic import SyntheticSpec, make_family

    return make_family(tmp_path_factory.mktemp("models"), SyntheticSpec(
        architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64, max_shard_bytes=20_000))


def _merge(tmp_path: Path, cfg: dict) -> tuple[int, Path]:
    import yaml

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cli_main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]), path


def test_a_model_given_as_one_shard_of_a_sharded_checkpoint_is_refused(models: Path, tmp_path: Path, capsys) -> None:
    """Each model given as its first shard file merged those 5 tensors of 21 into a partial model
    (exit 0): a shard named -0000N-of-0000M, or one an index beside it lists, is not a model."""
    shard = sorted((models / "m1").glob("model-*.safetensors"))[0]
    other = sorted((models / "m2").glob("model-*.safetensors"))[0]
    before = tree_hash(models)
    code, _ = _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0},
                                "models": [{"model": str(shard)}, {"model": str(other)}]})
    assert code == 2
    _one_line_error(capsys, f"{shard}: one shard of a sharded checkpoint, not a whole model; give its folder "
                            f"{models / 'm1'}")
    assert not (tmp_path / "out").exists() and tree_hash(models) == before
    # A shard the index lists under a name of its own is one shard too.
    from simmerge_ray.errors import CheckpointError
    from simmerge_ray.io.checkpoint import Checkpoint
    from simmerge_ray.io.checkpoint_files import INDEX_FILE

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    index = json.loads((models / "m1" / INDEX_FILE).read_text())
    index["weight_map"] = {n: f.replace("model-00001-of-00005", "part-a") for n, f in index["weight_map"].items()}
    (renamed / INDEX_FILE).write_text(json.dumps(index))
    (renamed / "part-a.safetensors").write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError, match="part-a.safetensors: one shard of a sharded checkpoint"):
        Checkpoint.open(renamed / "part-a.safetensors")
    # The one shard of a one-shard checkpoint is the whole model.
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "model-00001-of-00001.safetensors").write_bytes(shard.read_bytes())
    (whole / INDEX_FILE).write_text(json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors"
                                                               for n in Checkpoint.open(shard.parent).entries}}))
    assert len(Checkpoint.open(whole / "model-00001-of-00001.safetensors").entries) == 5


def test_models_of_different_architectures_are_merged_only_with_allow_crimes(models: Path, tmp_path: Path,
                                                                            capsys) -> None:
    """A llama and a mistral of one size share every tensor name and shape: their merge ran with no
    word and wrote a config of whichever came first. mergekit refuses it without --allow-crimes."""
    import shutil

    mistral = tmp_path / "mistral-m2"
    shutil.copytree(models / "m2", mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral",
                                                     "architectures": ["MistralForCausalLM"]}))
    before = tree_hash(tmp_path)
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
           "models": [{"model": str(models / "m1")}, {"model": str(mistral)}]}
    code, path = _merge(tmp_path, cfg)
    assert code == 2
    _one_line_error(capsys, f"model {str(mistral)!r} ({mistral}) is a 'mistral' checkpoint but model "
                            f"{str(models / 'm1')!r} ({models / 'm1'}) is 'llama' (config.json model_type): checkpoints "
                            f"of different architectures are not merged unless you pass --allow-crimes, as mergekit does")
    assert tree_hash(tmp_path) == {**before, "merge.yaml": tree_hash(tmp_path)["merge.yaml"]}
    out = tmp_path / "out"
    assert cli_main(["merge", str(path), "--out", str(out), "--quiet", "--allow-crimes"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # A plan over a catalog holding both, run step by step (TIES is no linear fold), the same way.
    from simmerge_ray.planner.plan import Plan

    (tmp_path / "catalog.yaml").write_text(f"base: {models / 'base'}\nmodels:\n  - {{name: m1, path: {models / 'm1'}}}\n"
                                           f"  - {{name: m2, path: {mistral}}}\n")
    (tmp_path / "plan.json").write_text(Plan(task="code", models=["m1", "m2"], operators=["ties"]).to_json())
    plan_args = ["merge", "--plan", str(tmp_path / "plan.json"), "--catalog", str(tmp_path / "catalog.yaml"), "--quiet"]
    assert cli_main([*plan_args, "--out", str(tmp_path / "p1")]) == 2
    _one_line_error(capsys, "is a 'mistral' checkpoint but", "--allow-crimes")
    assert cli_main([*plan_args, "--out", str(tmp_path / "p2"), "--allow-crimes", "--dry-run"]) == 0
    assert cli_main([*plan_args, "--out", str(tmp_path / "p2"), "--allow-crimes"]) == 0
    assert json.loads((tmp_path / "p2" / "config.json").read_text())["model_type"] == "llama"


def test_a_tokenizer_source_without_tokenizer_files_says_so(models: Path, tmp_path: Path, capsys) -> None:
    """transformers' message for a folder without tokenizer files, cut to one line, ended in
    "Couldn't instantiate the backend tokenizer from one of: " and named no file."""
    before = tree_hash(models)
    code, path = _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0}, "tokenizer_source": "base",
                                   "models": [{"model": str(models / "m1")}, {"model": str(models / "m2")}]})
    assert code == 2
    _one_line_error(capsys, f"{path}: model {str(models / 'm1')!r}: cannot load the tokenizer of {models / 'm1'}: "
                            "no tokenizer files there (tokenizer.json")
    assert not (tmp_path / "out").exists() and tree_hash(models) == before


def test_a_base_given_as_a_lone_file_takes_the_config_from_the_first_model_folder(models: Path, tmp_path: Path,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The output's config came from the base only: given as one .safetensors file, the merged
    folder had no config.json (transformers cannot load it) and nothing said so."""
    from safetensors.torch import load_file, save_file

    lone = tmp_path / "base.safetensors"
    state = {}
    for shard in sorted((models / "base").glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, str(lone))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(lone),
           "models": [{"model": str(models / m), "parameters": {"weight": 0.5}} for m in ("m1", "m2")]}
    with caplog.at_level("WARNING"):
        code, _ = _merge(tmp_path, cfg)
    assert code == 0
    written, m1 = (json.loads(p.read_text()) for p in (tmp_path / "out" / "config.json", models / "m1" / "config.json"))
    assert {k: v for k, v in written.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in m1.items() if k not in ("dtype", "torch_dtype")}
    assert f"{lone} is a lone .safetensors file: the output's config.json and tokenizer come from {models / 'm1'}" \
        in caplog.text


@pytest.mark.parametrize("extra, named", [(["--dtype", "bfloat16"], "--dtype"), (["--catalog", "c.yaml"], "--catalog")])
def test_plan_only_options_with_a_config_are_refused(models: Path, tmp_path: Path, capsys, extra: list[str],
                                                     named: str) -> None:
    """`merge CONFIG --dtype bfloat16` wrote the config's dtype without a word: --dtype (and
    --catalog) are a plan's; a config sets out_dtype itself."""
    import yaml

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0},
                                    "models": [{"model": str(models / "m1")}, {"model": str(models / "m2")}]}))
    assert cli_main(["merge", str(path), "--out", str(tmp_path / "out"), *extra]) == 2
    _one_line_error(capsys, f"{named} go with --plan; {path} names its models and sets its output dtype itself")
    assert not (tmp_path / "out").exists()
