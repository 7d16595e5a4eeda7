"""Bad checkpoints given to `simmerge features structural`: one line, exit 2, refused before
the pass reads any weight, nothing written to --out and the inputs unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.synthetic import SyntheticSpec, make_family

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)
TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_family(tmp_path_factory.mktemp("models"), SPEC)


def _single_file_copy(src: Path, dst: Path) -> Path:
    """`src` as one model.safetensors with TENSOR stored as int32, beside its config.json."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    state[TENSOR] = (state[TENSOR].float() * 1000).int()
    save_file(state, str(dst / "model.safetensors"))
    return dst


def _run(root: Path, entries: list[tuple[str, Path]], capsys: pytest.CaptureFixture, *needles: str) -> None:
    catalog = root / "catalog.yaml"
    catalog.write_text("models:\n" + "".join(f"  - {{name: {n}, path: {p}}}\n" for n, p in entries))
    out = root / "feats"
    assert cli_main(["features", "structural", "--catalog", str(catalog), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert not out.exists()


@pytest.mark.parametrize("int_first", [False, True])
def test_a_tensor_float_in_one_model_and_int_in_another_is_refused(models: Path, tmp_path: Path, capsys,
                                                                    int_first: bool) -> None:
    """Its integers were folded into the Gram as weights (int in a later model), or the tensor was
    silently left out (int in the first model): features that depended on catalog order."""
    ints = _single_file_copy(models / "m2", tmp_path / "ints")
    before = (ints / "model.safetensors").read_bytes()
    entries = [("ints", ints), ("m1", models / "m1")] if int_first else [("m1", models / "m1"), ("ints", ints)]
    _run(tmp_path, entries, capsys, f"tensor {TENSOR!r} is", "I32", "BF16", str(ints / "model.safetensors"))
    assert (ints / "model.safetensors").read_bytes() == before


def test_a_lone_safetensors_file_beside_folders_is_named_as_such(models: Path, tmp_path: Path, capsys) -> None:
    """The message named .../model.safetensors/config.json, a path that cannot exist."""
    lone = _single_file_copy(models / "m1", tmp_path / "lone") / "model.safetensors"
    _run(tmp_path, [("lone", lone), ("m2", models / "m2")], capsys,
         f"model 'lone' ({lone}: a lone file, without config.json): no vocab_size, beside models that state one (")


def test_a_bad_num_hidden_layers_is_refused_before_the_pass(models: Path, tmp_path: Path, capsys) -> None:
    """It was found only when the outputs were written, after every weight had been read, and
    left an empty --out folder behind."""
    bad = tmp_path / "bad"
    shutil.copytree(models / "m1", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    _run(tmp_path, [("bad", bad), ("m2", models / "m2")], capsys,
         f"{bad / 'config.json'}: num_hidden_layers: expected a whole number, got 'two'")
