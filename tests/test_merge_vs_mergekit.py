"""Every operator equals mergekit's result on small random checkpoints (mergekit is the oracle).

Two architectures, sharded inputs, bf16 and fp32 storage, several parameter settings each,
gradients and filters included. mergekit runs in-process on the same YAML; we run the streaming
Ray executor. Math is float32 on both sides (mergekit with `dtype: float32`), so results agree
to float32 rounding, then to the output dtype's rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from mergekit_oracle import load_all, make_zoo, run_mergekit

ARCHS = {
    "llama": SyntheticSpec(architecture="llama", hidden_size=32, num_layers=3, num_heads=4, vocab_size=96,
                           max_shard_bytes=40_000),
    "qwen2": SyntheticSpec(architecture="qwen2", hidden_size=32, num_layers=3, num_heads=4,
                              vocab_size=96, max_shard_bytes=40_000),
}

CASES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "m1", "parameters": {"weight": 0.7}},
        {"model": "m2", "parameters": {"weight": [0.1, 0.9]}},
        {"model": "m3", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}}]},
    "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "m1", "parameters": {"weight": 0.3}}, {"model": "m2", "parameters": {"weight": 0.3}}]},
    "slerp": {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": 0.35},
              "models": [{"model": "m1"}, {"model": "m2"}]},
    "slerp_gradient": {"merge_method": "slerp", "base_model": "m2",
                       "slices": [{"sources": [{"model": "m1", "layer_range": [0, 3]},
                                               {"model": "m2", "layer_range": [0, 3]}]}],
                       "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 1]},
                                            {"filter": "mlp", "value": [1, 0.5, 0.7, 0]},
                                            {"value": 0.5}]}},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        {"model": "m3", "parameters": {"weight": 0.4, "density": 0.3}}]},
    "ties_unnormalized_lambda": {"merge_method": "ties", "base_model": "base",
                                 "parameters": {"normalize": False, "lambda": 0.8}, "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": "m2", "parameters": {"weight": 1.0, "density": 0.9}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.7},
                        "models": [{"model": "m1", "parameters": {"weight": 0.5}},
                                   {"model": "m2", "parameters": {"weight": 0.9}},
                                   {"model": "base"}]},
    # DARE's masks are random; mergekit draws them from torch's global RNG, we seed per tensor.
    # At density 1 the methods are deterministic and must agree exactly.
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "m2", "parameters": {"weight": 0.7, "density": 1.0}}]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 1.0}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 1.0}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "parameters": {"gamma": 0.05}, "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.1}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.9}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "parameters": {"normalize": True},
                         "models": [{"model": "m1", "parameters": {"weight": 1.0, "density": 0.8}},
                                    {"model": "m2", "parameters": {"weight": 1.0, "density": 0.6}},
                                    {"model": "m3", "parameters": {"weight": 0.5, "density": 0.97}}]},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """base + three fine-tune-like variants per (architecture, storage dtype), sharded."""
    root = tmp_path_factory.mktemp("zoo")
    return {(arch, dtype): make_zoo(root / f"{arch}-{dtype}", dataclasses.replace(spec, dtype=dtype))
            for arch, spec in ARCHS.items() for dtype in ("bfloat16", "float32")}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_operator_matches_mergekit(zoo, tmp_path: Path, arch: str, case: str) -> None:
    # llama in both storage dtypes; qwen2 (biases, another layout) in bf16.
    for dtype in ("bfloat16", "float32") if arch == "llama" else ("bfloat16",):
        root = zoo[(arch, dtype)]
        cfg = {**CASES[case], "dtype": "float32", "out_dtype": "float32"}
        (root / f"{case}.yaml").write_text(yaml.safe_dump(cfg))
        ours, theirs = tmp_path / f"ours-{dtype}", tmp_path / f"mk-{dtype}"
        # two worker threads over several shards; the Ray placement gives the same bytes
        # (test_merge_executor), so one placement suffices here
        opts = ExecOptions(workers=2, shard_bytes=30_000)
        run_merge(MergeSpec.load(root / f"{case}.yaml"), ours, opts)
        run_mergekit(cfg, root, theirs)
        a, b = load_all(ours), load_all(theirs)
        assert set(a) == set(b), f"tensor sets differ: {set(a) ^ set(b)}"
        for name in a:
            assert a[name].dtype == b[name].dtype == torch.float32
            torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=f"{case} {arch} {dtype} {name}")
        # the merge did something: the output is not a copy of an input
        m1 = Checkpoint.open(root / "m1")
        assert any(not torch.equal(a[n], m1.read_f32(n)) for n in a)


def test_bf16_output_is_rounded_float32_result(ray_cluster, zoo, tmp_path: Path) -> None:
    root = zoo[("llama", "bfloat16")]
    for out_dtype in ("float32", "bfloat16"):
        cfg = {**CASES["ties"], "dtype": "float32", "out_dtype": out_dtype}
        (root / f"ties-{out_dtype}.yaml").write_text(yaml.safe_dump(cfg))
        run_merge(MergeSpec.load(root / f"ties-{out_dtype}.yaml"), tmp_path / out_dtype, ExecOptions())
    f32, bf16 = load_all(tmp_path / "float32"), load_all(tmp_path / "bfloat16")
    for name in f32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], f32[name].to(torch.bfloat16))


TIED_CASES = {
    "untied_first": {"merge_method": "linear", "models": [{"model": "m1", "parameters": {"weight": 0.6}},
                                                          {"model": "t1", "parameters": {"weight": 0.4}}]},
    "tied_first": {"merge_method": "linear", "models": [{"model": "t1", "parameters": {"weight": 0.6}},
                                                        {"model": "m1", "parameters": {"weight": 0.4}}]},
    "tied_base": {"merge_method": "ties", "base_model": "tbase", "models": [
        {"model": "m1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "t1", "parameters": {"weight": 0.5, "density": 0.5}}]},
    "all_tied": {"merge_method": "linear", "models": [{"model": "t1", "parameters": {"weight": 0.5}},
                                                      {"model": "t2", "parameters": {"weight": 0.5}}]},
}


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untied base and fine-tune beside fine-tunes that tie their head to the embeddings (no
    lm_head.weight on disk), and a tied base of their own."""
    from simmerge_ray.io.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("tied")
    spec = dataclasses.replace(ARCHS["llama"], dtype="float32")
    tied = dataclasses.replace(spec, tie_word_embeddings=True)
    make_checkpoint(root / "base", spec)
    make_checkpoint(root / "m1", dataclasses.replace(spec, seed=1), base=root / "base", delta_std=0.01)
    for i, name in ((2, "t1"), (3, "t2")):
        make_checkpoint(root / name, dataclasses.replace(tied, seed=i), base=root / "base", delta_std=0.01)
    make_checkpoint(root / "tbase", dataclasses.replace(tied, seed=4))
    return root


@pytest.mark.parametrize("case", list(TIED_CASES))
def test_a_tied_head_beside_untied_ones_matches_mergekit(tied_zoo: Path, tmp_path: Path, case: str) -> None:
    """A model that ties its head is read through its embedding (mergekit's tied_names): the head is
    merged, and written, wherever some model stores one; the output config then unties it, so the
    merged head is what loads. With every model tied there is no head to write."""
    cfg = {**TIED_CASES[case], "dtype": "float32", "out_dtype": "float32"}
    (tied_zoo / f"{case}.yaml").write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "ours", tmp_path / "mk"
    run_merge(MergeSpec.load(tied_zoo / f"{case}.yaml"), ours, ExecOptions(workers=1))
    run_mergekit(cfg, tied_zoo, theirs)
    a, b = load_all(ours), load_all(theirs)
    assert set(a) == set(b) and ("lm_head.weight" in a) == (case != "all_tied")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=f"{case} {name}")
    if "lm_head.weight" in a:
        m1, t1 = Checkpoint.open(tied_zoo / "m1"), Checkpoint.open(tied_zoo / "t1")
        assert not torch.equal(a["lm_head.weight"], m1.read_f32("lm_head.weight"))
        if TIED_CASES[case]["merge_method"] == "linear":  # t1's share of the head is its embedding
            w = {m["model"]: m["parameters"]["weight"] for m in TIED_CASES[case]["models"]}
            want = w["m1"] * m1.read_f32("lm_head.weight") + w["t1"] * t1.read_f32("model.embed_tokens.weight")
            torch.testing.assert_close(a["lm_head.weight"], want, rtol=1e-6, atol=1e-6)
    assert Checkpoint.open(ours).tied_embeddings == (case == "all_tied")


def test_a_gpt2_frankenmerge_takes_its_embeddings_from_the_first_slice(tmp_path: Path) -> None:
    """GPT-2's position embedding `wpe` comes before the blocks, as `wte` does: a frankenmerge
    takes it from its first slice's model, as mergekit does (it came from the last slice's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for i, name in enumerate(("g1", "g2")):
        torch.manual_seed(i)
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
            tmp_path / name)
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": "g1", "layer_range": [0, 2]}]},
                      {"sources": [{"model": "g2", "layer_range": [1, 2]}]}]}
    (tmp_path / "frank.yaml").write_text(yaml.safe_dump({**cfg, "slices": [
        {"sources": [{**s, "model": str(tmp_path / s["model"])} for s in sl["sources"]]} for sl in cfg["slices"]]}))
    run_merge(MergeSpec.load(tmp_path / "frank.yaml"), tmp_path / "ours", ExecOptions())
    run_mergekit(cfg, tmp_path, tmp_path / "theirs")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "theirs")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    first = Checkpoint.open(tmp_path / "g1")
    assert all(torch.equal(ours[n], first.read(n)) for n in ("transformer.wpe.weight", "transformer.wte.weight"))


def test_tensors_outside_the_blocks_are_placed_as_mergekit_places_them() -> None:
    """Every pre- and post-block tensor that mergekit's architecture files name for a one-module
    architecture is placed on the same side here: a frankenmerge takes the first slice's pre
    tensors and the last slice's post ones. chatglm's `rotary_pos_emb.inv_freq` and jais's
    `relative_pe.slopes` came from the last slice, and an unprefixed `wte.weight` too."""
    import json

    import mergekit

    from simmerge_ray.merge.tensor_plan import _is_pre

    root = Path(mergekit.__file__).parent / "_data" / "architectures"
    checked, wrong = 0, []
    for f in sorted(root.glob("*.json")):
        arch = json.loads(f.read_text())
        if "modules" in arch:  # modular checkpoints: placed by their module layouts, checked below
            continue
        for key, pre in (("pre_weights", True), ("post_weights", False)):
            for w in arch.get(key) or []:
                for name in (w["name"], *w.get("aliases", ())):  # `wte.weight`: GPT-2 as published
                    checked += 1
                    if _is_pre(name) != pre:
                        wrong.append(f"{f.stem}: {name} ({key})")
    assert checked > 100 and wrong == []


def test_modular_architectures_place_their_post_tensors_as_mergekit() -> None:
    """Each module of the modular architectures we merge (simmerge_ray/merge/modules.py LAYOUTS)
    has the post-block tensors that mergekit's architecture file declares for it, no more."""
    import json

    import mergekit

    from simmerge_ray.merge.modules import LAYOUTS

    root = Path(mergekit.__file__).parent / "_data" / "architectures"
    theirs = {a: json.loads(f.read_text()) for f in root.glob("*.json")
              for a in json.loads(f.read_text()).get("architectures", [])}
    for arch, layouts in LAYOUTS.items():
        modules = theirs[arch]["modules"]
        assert set(modules) == set(layouts), arch
        for name, module in modules.items():
            prefix = module.get("weight_prefix") or ""
            post = {prefix + w["name"] for w in module["architecture"].get("post_weights", [])}
            assert set(layouts[name].post) == post, (arch, name)


@pytest.mark.parametrize("case", ["frankenmerge", "mixed_names"])
def test_gpt2_as_published_merges_as_mergekit_merges_it(tmp_path: Path, case: str) -> None:
    """GPT-2 as its authors published it stores its base model's names (`h.0...`, `wte.weight`),
    its fine-tunes the full model's (`transformer.h.0...`). mergekit reads both through its
    aliases and writes the full names; so do we. Before, a frankenmerge of such checkpoints took
    no tensor for a block (`h.0.` was not seen as one: 2 blocks written under a config of 3, the
    embeddings from the last slice) and a published model beside its fine-tune was refused."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    for i, name in enumerate(("g1", "g2")):
        torch.manual_seed(i)
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
            tmp_path / name)
        if name == "g1" or case == "frankenmerge":
            weights = tmp_path / name / "model.safetensors"
            save_file({n.removeprefix("transformer."): t for n, t in load_file(weights).items()}, weights)
    cfg = ({"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": "g1", "layer_range": [0, 2]}]},
                       {"sources": [{"model": "g2", "layer_range": [1, 2]}]}]} if case == "frankenmerge" else
           {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": "g1", "parameters": {"weight": 0.3}}, {"model": "g2", "parameters": {"weight": 0.7}}]})
    absolute = yaml.safe_load(yaml.safe_dump(cfg))
    for m in [s for sl in absolute.get("slices", []) for s in sl["sources"]] + absolute.get("models", []):
        m["model"] = str(tmp_path / m["model"])
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(absolute))
    run_merge(MergeSpec.load(tmp_path / "merge.yaml"), tmp_path / "ours", ExecOptions())
    run_mergekit(cfg, tmp_path, tmp_path / "theirs")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "theirs")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    if case == "frankenmerge":
        assert {n for n in ours if n.startswith("transformer.h.2.")} and "transformer.h.3.ln_1.weight" not in ours
        first = Checkpoint.open(tmp_path / "g1")
        assert torch.equal(ours["transformer.wte.weight"], first.read("transformer.wte.weight"))


def test_vocabulary_tensors_are_those_mergekit_declares() -> None:
    """Every tensor outside the blocks that mergekit's architecture files name (aliases and module
    prefixes included) is taken for a vocabulary tensor (re-indexed by a `tokenizer:` merge,
    compared on shared rows) exactly where mergekit declares a vocabulary axis (phi-1's templated
    head aside): Falcon's `word_embeddings`, GPT-NeoX's `embed_in`, InternLM2's `output`, ChatGLM's
    `output_layer` and T5's `shared`, among others, were not.
    BLOOM (no mergekit file) names its embedding as Falcon does, its LayerNorm beside it not."""
    import json

    import mergekit

    from simmerge_ray.features.module_groups import is_vocabulary_name

    root = Path(mergekit.__file__).parent / "_data" / "architectures"
    checked, wrong = 0, []
    for f in sorted(root.glob("*.json")):
        arch = json.loads(f.read_text())
        parts = ([(m["architecture"], (m.get("weight_prefix") or "").rstrip(".") + ".") for m in arch["modules"].values()]
                 if "modules" in arch else [(arch, "")])
        for part, prefix in parts:
            for w in (part.get("pre_weights") or []) + (part.get("post_weights") or []):
                for name in (w["name"], *w.get("aliases", ())):
                    if "${" in name:  # phi-1's head, stored as a block past the last
                        continue
                    checked += 1
                    full = (prefix + name).lstrip(".")
                    if is_vocabulary_name(full) != (w.get("vocabulary_axis") is not None):
                        wrong.append(f"{f.stem}: {full}")
    assert checked > 300 and wrong == []
    # Names of other models, and look-alikes that are norms, not vocabulary tables
    assert all(map(is_vocabulary_name, ("transformer.word_embeddings.weight", "transformer.tokens_embed.weight",
                                        "transformer.word_embedding.weight", "generator_lm_head.weight", "wte.weight",
                                        "lm_head.bias")))
    assert not any(map(is_vocabulary_name, ("transformer.word_embeddings_layernorm.weight", "model.output_layernorm.weight",
                                            "embed_out_norm.weight", "transformer.wpe.weight", "lm_head.ln.weight")))


def test_block_tensors_are_found_where_mergekit_finds_them() -> None:
    """Every block tensor of mergekit's one-module architecture files (its layer templates, aliases
    included: GPT-2's unprefixed `h.3.`) is taken for a tensor of that block; a frankenmerge
    renumbers and a depth check counts exactly those."""
    import json

    import mergekit

    from simmerge_ray.io.checkpoint import layer_index

    root = Path(mergekit.__file__).parent / "_data" / "architectures"
    checked, wrong = 0, []
    for f in sorted(root.glob("*.json")):
        arch = json.loads(f.read_text())
        if "modules" in arch or arch["model_type"] == "mixformer-sequential":  # modular: by its layout
            continue  # (modules.py); phi-1's mixformer (remote code): embedding and head at layers.0/N+1
        for w in (arch.get("layer_templates") or {}).get("weights", []):
            for name in (w["name"], *w.get("aliases", ())):
                checked += 1
                if layer_index(name.replace("${layer_index}", "3")) != 3:
                    wrong.append(f"{f.stem}: {name}")
    assert checked > 600 and wrong == []
