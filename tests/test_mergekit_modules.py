"""`modules:` with several modules (mergekit's modular architectures) matches mergekit tensor for
tensor, on tiny Mistral3 (Pixtral vision tower) and Qwen2-VL checkpoints built by transformers:
each module merged by its own `models` or `slices` (layer ranges relative to the module's
blocks) and `parameters`, the output config's depths written to the keys mergekit writes. Bad
module input fails in one line before any tensor is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_oracle import load_all, run_mergekit
from safetensors.torch import load_file, save_file

from simmerge_ray.cli import main as cli_main
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge


def _mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, head_dim=8)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=8)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           spatial_merge_size=2, image_token_index=5))


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                vocab_size=64, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=3, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=5,
                                                         video_token_id=6, vision_start_token_id=7))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, m1, m2 of each architecture: m1 and m2 are the base plus seeded noise."""
    out = {}
    for arch, build in (("mistral3", _mistral3), ("qwen2_vl", _qwen2_vl)):
        root = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        build().save_pretrained(root / "base", safe_serialization=True)
        if arch == "qwen2_vl":  # as published Qwen2-VL configs have it (mergekit reads the text depth there)
            path = root / "base" / "config.json"
            config = json.loads(path.read_text())
            path.write_text(json.dumps({**config, "num_hidden_layers": config["text_config"]["num_hidden_layers"]}))
        base = load_file(root / "base" / "model.safetensors")
        for i in (1, 2):
            (root / f"m{i}").mkdir()
            (root / f"m{i}" / "config.json").write_text((root / "base" / "config.json").read_text())
            g = torch.Generator().manual_seed(i)
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                      root / f"m{i}" / "model.safetensors", metadata={"format": "pt"})
        out[arch] = root
    return out


CASES = {
    ("mistral3", "ties_text_subset_vision_models"): {
        "merge_method": "ties", "base_model": "base", "dtype": "float32", "parameters": {"normalize": True},
        "modules": {
            "text_decoder": {"slices": [{"sources": [
                {"model": "base", "layer_range": [0, 3]},
                {"model": "m1", "layer_range": [0, 3], "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": "m2", "layer_range": [1, 4], "parameters": {"weight": 0.4, "density": 0.7}}]}]},
            "vision_tower": {"models": [{"model": "m1", "parameters": {"weight": 1.0, "density": 0.9}},
                                        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.3}}],
                             "parameters": {"normalize": False}},
        },
    },
    ("mistral3", "task_arithmetic_three_modules_stacked"): {
        "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
        "parameters": {"weight": 0.3},
        "modules": {
            "vision_tower": {"slices": [
                {"sources": [{"model": "base", "layer_range": [0, 2]},
                             {"model": "m1", "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.8]}}]},
                {"sources": [{"model": "base", "layer_range": [2, 3]}, {"model": "m2", "layer_range": [0, 1]}],
                 "parameters": {"weight": 0.9}}]},
            "multi_modal_projector": {"models": [{"model": "m2"}, {"model": "m1"}], "parameters": {"weight": 0.5}},
            "text_decoder": {"models": [{"model": "m1", "parameters": {"weight": [{"filter": "mlp", "value": 1.2},
                                                                                    {"value": 0.1}]}},
                                        {"model": "m2"}]},
        },
    },
    ("mistral3", "linear_text_decoder_only"): {
        "merge_method": "linear", "dtype": "float32",
        "modules": {"text_decoder": {"slices": [{"sources": [
            {"model": "m1", "layer_range": [2, 4], "parameters": {"weight": 0.25}},
            {"model": "m2", "layer_range": [0, 2], "parameters": {"weight": 0.75}}]}]}},
    },
    ("qwen2_vl", "linear_text_subset_vision_models"): {
        "merge_method": "linear", "dtype": "float32",
        "modules": {
            "text_decoder": {"slices": [{"sources": [
                {"model": "base", "layer_range": [1, 3], "parameters": {"weight": 0.3}},
                {"model": "m1", "layer_range": [0, 2], "parameters": {"weight": 0.7}}]}]},
            "vision_tower": {"models": [{"model": "m1", "parameters": {"weight": 1.0}},
                                        {"model": "m2", "parameters": {"weight": [0.5, 0.1]}}]},
        },
    },
    ("qwen2_vl", "ties_vision_subset_projector"): {
        "merge_method": "ties", "base_model": "base", "dtype": "float32",
        "parameters": {"density": 0.6, "weight": 0.5},
        "modules": {
            "vision_tower": {"slices": [{"sources": [{"model": "base", "layer_range": [1, 3]},
                                                     {"model": "m1", "layer_range": [0, 2]},
                                                     {"model": "m2", "layer_range": [1, 3],
                                                      "parameters": {"density": 0.3}}]}]},
            "multi_modal_projector": {"models": [{"model": "m1"}, {"model": "m2"}],  # its mlp at t = 1, as mergekit
                                      "parameters": {"density": [0.9, 0.4]}},
            "text_decoder": {"models": [{"model": "m2"}, {"model": "m1", "parameters": {"weight": 0.8}}]},
        },
    },
}


def _depths(config: dict) -> tuple:
    return (config.get("num_hidden_layers"), config["text_config"].get("num_hidden_layers"),
            config["vision_config"].get("num_hidden_layers"), config["vision_config"].get("depth"))


def _match_mergekit(root: Path, tmp_path: Path, case: tuple[str, str], cfg: dict) -> dict[str, torch.Tensor]:
    """Merge `cfg` with simmerge and with mergekit: the same tensor names, values to float32
    rounding (as tests/test_merge_vs_mergekit.py: the kernels' order of operations), the same
    depth keys in config.json. Returns our tensors."""
    (root / f"{case[1]}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_merge(MergeSpec.load(root / f"{case[1]}.yml"), tmp_path / "ours", ExecOptions())
    run_mergekit(cfg, root, tmp_path / "mk")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-6, msg=f"{case} {name}")
    mine = json.loads((tmp_path / "ours" / "config.json").read_text())
    mk = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert _depths(mine) == _depths(mk)
    return ours


@pytest.mark.parametrize("case", list(CASES), ids=["-".join(c) for c in CASES])
def test_modules_match_mergekit(zoo, tmp_path: Path, case: tuple[str, str]) -> None:
    root, cfg = zoo[case[0]], CASES[case]
    ours = _match_mergekit(root, tmp_path, case, cfg)
    if len(cfg["modules"]) > 1:  # the model card says which settings belong to which module
        card = (tmp_path / "ours" / "README.md").read_text()
        assert all(name in card for name in cfg["modules"]), card
    base = Checkpoint.open(root / "base")  # the merge changed every module it names
    assert all(not torch.equal(ours[n], base.read_f32(n)) for n in ours if n in base.entries and "norm" not in n)


# Top-level `models:` on a modular architecture: mergekit gives the list to every module of the
# architecture, each merged over its own blocks, so a gradient spreads over each module's depth
# (4 text layers, 3 vision blocks, none in the projector), not over one flat run of layers.
TOP_MODELS = {
    (arch, "ties_top_level_models_gradients"): {
        "merge_method": "ties", "base_model": "base", "dtype": "float32", "parameters": {"normalize": True},
        "models": [{"model": "m1", "parameters": {"weight": [0.2, 0.8], "density": [0.3, 0.9]}},
                   {"model": "m2", "parameters": {"weight": 0.5, "density": [0.9, 0.4, 0.6]}}],
    } for arch in ("mistral3", "qwen2_vl")
} | {
    (arch, "linear_top_level_models_gradients"): {
        "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
        "models": [{"model": "m1", "parameters": {"weight": [0.2, 0.8]}},
                   {"model": "m2", "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 0.1]},
                                                             {"value": [0.7, 0.3, 0.5]}]}}],
    } for arch in ("mistral3", "qwen2_vl")
}


@pytest.mark.parametrize("case", list(TOP_MODELS), ids=["-".join(c) for c in TOP_MODELS])
def test_top_level_models_match_mergekit_module_by_module(zoo, tmp_path: Path, case: tuple[str, str]) -> None:
    root = zoo[case[0]]
    ours = _match_mergekit(root, tmp_path, case, TOP_MODELS[case])
    base = Checkpoint.open(root / "base")  # every module is in the output, as in the inputs
    assert sorted(ours) == sorted(base.entries)


def test_top_level_slices_refused_as_mergekit(zoo, tmp_path: Path, capsys, no_tensor_reads) -> None:
    """mergekit refuses top-level `slices:` on a model of several modules; so do we, in one line."""
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5}, "dtype": "float32",
           "slices": [{"sources": [{"model": "m1", "layer_range": [0, 2]}, {"model": "m2", "layer_range": [1, 3]}]}]}
    for arch, name in (("mistral3", "Mistral3ForConditionalGeneration"), ("qwen2_vl", "Qwen2VLForConditionalGeneration")):
        path = zoo[arch] / "top-level-slices.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert cli_main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        for needle in (str(path), ": slices: ", "layer_range [[0, 2]]", name, "modules:"):
            assert needle in err, err
        assert not (tmp_path / "out").exists()


def test_top_level_slices_mergekit_refuses(zoo, tmp_path: Path) -> None:
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5}, "dtype": "float32",
           "slices": [{"sources": [{"model": "m1", "layer_range": [0, 2]}, {"model": "m2", "layer_range": [1, 3]}]}]}
    for arch in ("mistral3", "qwen2_vl"):
        with pytest.raises(RuntimeError, match="must use modules: config syntax"):
            run_mergekit(cfg, zoo[arch], tmp_path / f"mk-{arch}")


def test_top_level_models_with_tokenizer_refused(zoo) -> None:
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.merge.executor import check_merge

    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5}, "tokenizer_source": "base",
           "models": [{"model": "m1"}, {"model": "m2"}]}
    with pytest.raises(ConfigError, match=r"tokenizer_source: not supported on Mistral3ForConditionalGeneration"):
        check_merge(MergeSpec.from_dict(cfg, root=zoo["mistral3"]))


def test_modules_on_ray_equal_local(ray_cluster, zoo, tmp_path: Path) -> None:
    root = zoo["mistral3"]
    path = root / "ray.yml"
    path.write_text(yaml.safe_dump(CASES[("mistral3", "task_arithmetic_three_modules_stacked")], sort_keys=False))
    run_merge(MergeSpec.load(path), tmp_path / "local", ExecOptions())
    run_merge(MergeSpec.load(path), tmp_path / "ray", ExecOptions(placement="ray", workers=2, unit_elems=256))
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes()


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    for name in ("read", "read_range", "read_into", "map_range", "read_f32"):
        monkeypatch.setattr(Checkpoint, name, refuse)


BAD = {
    "unknown_module": (
        "mistral3", {"vision_encoder": {"models": [{"model": "m1"}, {"model": "m2"}]}},
        ["modules.vision_encoder", "unknown module 'vision_encoder'", "Mistral3ForConditionalGeneration"]),
    "range_beyond_module_depth": (
        "qwen2_vl", {"vision_tower": {"slices": [{"sources": [{"model": "m1", "layer_range": [0, 4]},
                                                              {"model": "m2", "layer_range": [0, 4]}]}]}},
        ["modules.vision_tower.slices[0].sources[0].layer_range", "[0, 4]",
         "beyond the 3 layers (vision_config.depth)"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_modules_fail_in_one_line_before_reading(zoo, tmp_path: Path, capsys, no_tensor_reads, case: str) -> None:
    arch, bad, needles = BAD[case]
    modules = {"text_decoder": {"models": [{"model": "m1"}, {"model": "m2"}]}, **bad}
    path = zoo[arch] / f"bad-{case}.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 0.5}, "modules": modules},
                                   sort_keys=False))
    assert cli_main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in (str(path), *needles):
        assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_several_modules_need_a_modular_architecture(tmp_path: Path) -> None:
    from simmerge_ray.errors import ConfigError
    from simmerge_ray.io.synthetic import SyntheticSpec, make_family
    from simmerge_ray.merge.executor import check_merge

    root = make_family(tmp_path, SyntheticSpec(architecture="llama", hidden_size=16, num_layers=2, num_heads=2,
                                               vocab_size=32, intermediate_size=32))
    body = {"models": [{"model": "m1"}, {"model": "m2"}]}
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
           "modules": {"text_decoder": body, "vision_tower": body}}
    with pytest.raises(ConfigError, match=r"modules: 2 modules .* is not a supported modular architecture"):
        check_merge(MergeSpec.from_dict(cfg, root=root))
    with pytest.raises(ConfigError, match=r"tokenizer_source: not supported with several modules"):
        MergeSpec.from_dict({**cfg, "tokenizer_source": "base"}, root=root)
