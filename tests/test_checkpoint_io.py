"""Checkpoint reading: index from headers, lazy reads, tied embeddings, fingerprints, bad files."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.checkpoint import Checkpoint, layer_index
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "m", SPEC)


def test_index_and_reads_match_safetensors(sharded: Path) -> None:
    ck = Checkpoint.open(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) > 1
    reference: dict[str, torch.Tensor] = {}
    for f in files:
        reference.update(load_file(f))
    assert set(ck.tensor_names) == set(reference)
    for name, t in reference.items():
        got = ck.read(name)
        assert got.dtype == torch.bfloat16 and got.shape == t.shape
        assert torch.equal(got, t)
    assert ck.num_layers == 2
    assert ck.nbytes == sum(t.numel() * 2 for t in reference.values())


def test_mapped_ranges_equal_reads(sharded: Path) -> None:
    """Zero-copy views of the mapped shards equal positioned reads, at any offset, before and
    after the consumed pages are released; a Checkpoint with live mappings still pickles."""
    ck = Checkpoint.open(sharded)
    for name, entry in ck.entries.items():
        n = entry.numel
        for start, count in [(0, n), (n // 3, n - n // 3), (n - 1, 1), (n // 2, 0)]:
            view = ck.map_range(name, start, count)
            assert view.dtype == torch.bfloat16 and view.numel() == count
            assert torch.equal(view.clone(), ck.read_range(name, start, count))
        ck.release_range(name, 0, n)
        assert torch.equal(ck.map_range(name, 0, n).clone(), ck.read(name).reshape(-1))  # re-faulted
    clone = pickle.loads(pickle.dumps(ck))
    assert clone.entries == ck.entries and not clone._maps
    name = next(iter(ck.entries))
    assert torch.equal(clone.map_range(name, 0, 5).clone(), ck.read_range(name, 0, 5))
    with pytest.raises(CheckpointError, match=rf"range \[3, \d+\) outside tensor '{name}'"):
        ck.map_range(name, 3, ck.entries[name].numel)


def test_shard_truncated_after_open_is_named_when_mapped(tmp_path: Path, sharded: Path) -> None:
    """A shard cut short between opening and mapping gets an error naming the file and tensor,
    not a crash on touching pages past its end; the file itself is left as it was."""
    root = shutil.copytree(sharded, tmp_path / "c")
    ck = Checkpoint.open(root)
    name = max(ck.entries, key=lambda n: ck.entries[n].end)
    shard = ck.entries[name].file
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor '{name}' ends at byte {size}, "
                                              rf"the file has {size - 8}"):
        ck.map_range(name, 0, 1)
    assert shard.stat().st_size == size - 8


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_dtypes_round_trip(tmp_path: Path, dtype: str) -> None:
    out = make_checkpoint(tmp_path / dtype, dataclasses.replace(SPEC, dtype=dtype, max_shard_bytes=10**9))
    ck = Checkpoint.open(out)
    want = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = load_file(out / "model.safetensors")
    for name in ck.tensor_names:
        assert ck.read(name).dtype == want
        assert torch.equal(ck.read(name), ref[name])


def test_tied_embeddings_are_not_invented(tmp_path: Path) -> None:
    tied = Checkpoint.open(make_checkpoint(tmp_path / "tied", dataclasses.replace(SPEC, tie_word_embeddings=True)))
    untied = Checkpoint.open(make_checkpoint(tmp_path / "untied", SPEC))
    assert tied.tied_embeddings and "lm_head.weight" not in tied.entries
    assert "lm_head.weight" in untied.entries
    assert set(untied.entries) - set(tied.entries) == {"lm_head.weight"}


def test_layer_index() -> None:
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("gpt_neox.layers.12.attention.dense.weight") == 12
    assert layer_index("h.3.attn.c_attn.weight") == 3  # a base model's own save (GPT-2 as published)
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("with.3.x") is None and layer_index("model.layers_norm.weight") is None
    assert layer_index("layers.0.wte.weight") is None  # phi-1's mixformer: its embedding, not a block


def test_base_model_prefixes_are_transformers_own() -> None:
    """BASE_MODEL_PREFIX says where each listed model type's causal LM holds its base model, as
    transformers' classes do (a stale entry would read a published checkpoint under names no
    fine-tune of it has)."""
    import importlib

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from simmerge_ray.io.checkpoint import BASE_MODEL_PREFIX

    checked = 0
    for model_type, prefix in BASE_MODEL_PREFIX.items():
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        cls = getattr(importlib.import_module(f"transformers.models.{model_type}"), cls_name)
        assert cls.base_model_prefix == prefix, (model_type, cls.base_model_prefix)
        checked += 1
    assert checked == len(BASE_MODEL_PREFIX) >= 20


def test_a_base_models_names_are_read_under_the_full_models(tmp_path: Path) -> None:
    """A causal LM stored under its base model's names (GPT-2 as published: `h.0...`, `wte.weight`)
    is read under the full model's (`transformer.h.0...`), safetensors or pickle, each entry keeping
    its stored name; convert writes the names as stored. A base model's own config (`GPT2Model`), a
    model type not listed, or a checkpoint with the prefix somewhere keep their names."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(
        tmp_path / "full")
    full = load_file(tmp_path / "full" / "model.safetensors")
    stored = {n.removeprefix("transformer."): t for n, t in full.items()}
    config = json.loads((tmp_path / "full" / "config.json").read_text())

    def folder(name: str, cfg: dict, tensors: dict[str, torch.Tensor], *, pickled: bool = False) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        if pickled:
            torch.save(tensors, tmp_path / name / "pytorch_model.bin")
        else:
            save_file(tensors, tmp_path / name / "model.safetensors")
        return tmp_path / name

    for ck in (Checkpoint.open(folder("hub", config, stored)),
               Checkpoint.open(folder("hub-bin", config, stored, pickled=True), allow_pickle=True)):
        assert set(ck.entries) == set(full) and "transformer.h.1.attn.c_attn.weight" in ck.entries
        assert all(torch.equal(ck.read(n), full[n]) for n in full)
        assert ck.entries["transformer.wte.weight"].name == "wte.weight" and ck.num_layers == 2
    assert cli_main(["convert", str(tmp_path / "hub-bin"), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 0
    assert set(load_file(tmp_path / "conv" / "model.safetensors")) == set(stored)
    for name, cfg, tensors in (("base", {**config, "architectures": ["GPT2Model"]}, stored),
                               ("other", {**config, "model_type": "qwen"}, stored),
                               ("partly", config, {**stored, "transformer.extra": torch.zeros(2)})):
        assert set(Checkpoint.open(folder(name, cfg, tensors)).entries) == set(tensors)


def test_fingerprint_is_content_keyed(tmp_path: Path, sharded: Path) -> None:
    fp = Checkpoint.open(sharded).fingerprint()
    moved = shutil.copytree(sharded, tmp_path / "elsewhere")
    assert Checkpoint.open(moved).fingerprint() == fp
    other = make_checkpoint(tmp_path / "other", dataclasses.replace(SPEC, seed=5))
    assert Checkpoint.open(other).fingerprint() != fp
    # same header, one byte of data changed -> different fingerprint
    f = sorted(moved.glob("*.safetensors"))[-1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert Checkpoint.open(moved).fingerprint() != fp


def test_missing_shard_is_named(tmp_path: Path, sharded: Path) -> None:
    ck = shutil.copytree(sharded, tmp_path / "c")
    victim = sorted(ck.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} .*missing"):
        Checkpoint.open(ck)


def test_tensor_in_index_but_absent(tmp_path: Path, sharded: Path) -> None:
    ck = shutil.copytree(sharded, tmp_path / "c")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.9.ghost.weight"] = shard
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.9\.ghost\.weight' is listed .* absent"):
        Checkpoint.open(ck)


def test_truncated_and_corrupt_files(tmp_path: Path, sharded: Path) -> None:
    ck = shutil.copytree(sharded, tmp_path / "c")
    f = sorted(ck.glob("model-*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated: tensor '.*' ends at byte"):
        Checkpoint.open(ck)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[24:])
    with pytest.raises(CheckpointError, match=rf"{f.name}: corrupt safetensors header"):
        Checkpoint.open(ck)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint.open(ck)


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path: Path, sharded: Path, capsys) -> None:
    src = tmp_path / "bin"
    src.mkdir()
    state = {n: Checkpoint.open(sharded).read(n) for n in Checkpoint.open(sharded).tensor_names}
    torch.save(state, src / "pytorch_model.bin")
    shutil.copy(sharded / "config.json", src / "config.json")
    with pytest.raises(CheckpointError, match=r"pickle-based \.bin checkpoint.*simmerge convert"):
        Checkpoint.open(src)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv")]) == 2
    assert "pass --allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "conv").exists()
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "conv"), "--allow-pickle"]) == 0
    conv = Checkpoint.open(tmp_path / "conv")
    for n, t in state.items():
        assert torch.equal(conv.read(n), t)


def test_lone_safetensors_file(tmp_path: Path) -> None:
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "x.safetensors")
    ck = Checkpoint.open(tmp_path / "x.safetensors")
    assert torch.equal(ck.read("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    with pytest.raises(CheckpointError, match="no tensor named 'v'"):
        ck.read("v")
