"""Unusual inputs to `simmerge convert` and `simmerge merge` as a new user gives them: each is one
line (exit 2) naming the file, shard or tensor at fault, writes nothing and leaves the inputs as
they were. Each case here was once converted or merged silently wrong, or a traceback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from simmerge_ray.cli import main as cli_main

A, B = torch.arange(12.0).reshape(4, 3), torch.arange(5.0)


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


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
