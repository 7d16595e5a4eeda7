"""The methods mergekit has beyond linear/SLERP/TIES/DARE equal mergekit's result tensor for
tensor, on tiny llama and qwen2 checkpoints merged in-process; mergekit runs in-process as the
oracle. In float32 to float32 rounding; in bf16 and fp16 (`dtype`, from float32 inputs, so their
rounding counts) bit for bit: every method computes in `dtype` in mergekit's order of operations.
DARE and DELLA, which draw random masks, agree statistically in every dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mergekit_oracle import load_all, make_zoo, run_mergekit, ulps

from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge

ARCHS = {arch: SyntheticSpec(architecture=arch, hidden_size=16, num_layers=4, num_heads=2, vocab_size=32,
                             intermediate_size=32) for arch in ("llama", "qwen2")}
THREE = [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}]

CASES = {
    # four layers in all: mergekit 0.1.5 cannot write a qwen2 config of another depth (its
    # layer_types list keeps the input's length); deeper stacks are in the config-file tests
    "passthrough_stack": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "m1", "layer_range": [0, 2]}]},
        {"sources": [{"model": "m2", "layer_range": [1, 3],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": THREE},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "base",
                                "parameters": {"filter_wise": True}, "models": THREE},
    "breadcrumbs_per_model_gamma": {"merge_method": "breadcrumbs", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.1}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.02}}]},
    "ties_int8_mask": {"merge_method": "ties", "base_model": "base", "parameters": {"int8_mask": True}, "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 0.4, "density": 0.7}}]},
    # each model's kept magnitudes rescaled to its task vector's l1 norm, in the compute dtype's
    # arithmetic (the exact ratio flipped sign elections in bf16 and fp16)
    "ties_rescale": {"merge_method": "ties", "base_model": "base", "parameters": {"rescale": True}, "models": [
        {"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 0.5, "density": 0.3}}]},
    "nuslerp": {"merge_method": "nuslerp", "models": [
        {"model": "m1", "parameters": {"weight": 0.3}}, {"model": "m2", "parameters": {"weight": [0.2, 0.9]}}]},
    "nuslerp_base_row_wise": {"merge_method": "nuslerp", "base_model": "base",
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "models": [
        {"model": "m1", "parameters": {"weight": 0.6}}, {"model": "m2", "parameters": {"weight": 0.4}}]},
    "nuslerp_columns": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False}, "models": [
        {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 1.0}}]},
    "multislerp": {"merge_method": "multislerp", "models": [
        {"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.3}},
        {"model": "m3", "parameters": {"weight": 0.2}}]},
    "multislerp_base": {"merge_method": "multislerp", "base_model": "base", "parameters": {"weight": 1.0},
                        "models": THREE},
    "karcher": {"merge_method": "karcher", "parameters": {"max_iter": 20, "tol": 1e-6}, "models": THREE},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5}, "models": THREE},
    "sce_all": {"merge_method": "sce", "base_model": "base", "models": THREE},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "parameters": {"t": 0.005},
                 "models": [{"model": "base"}, {"model": "m1"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "m1"}]},
    "ram": {"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": 0.01}, "models": THREE},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base",
                   "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.4}, "models": THREE},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {arch: make_zoo(root / arch, spec) for arch, spec in ARCHS.items()}


@pytest.fixture(scope="module")
def f32_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama zoo stored in float32: merged in bf16/fp16, every input is rounded first."""
    spec = SyntheticSpec(**{**ARCHS["llama"].__dict__, "dtype": "float32"})
    return make_zoo(tmp_path_factory.mktemp("f32zoo"), spec)


def merge_both(cfg: dict, root: Path, tmp: Path, name: str, dtype: str | None = "float32") -> tuple[dict, dict]:
    """(ours, mergekit's) tensors for `cfg`, computed in `dtype` on both sides (float32 by
    default; None: the config's own)."""
    if dtype is not None:
        cfg = {**cfg, "dtype": dtype, "out_dtype": dtype}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run_merge(MergeSpec.load(root / f"{name}.yaml"), tmp / f"ours-{name}", ExecOptions())
    run_mergekit(cfg, root, tmp / f"mk-{name}")
    return load_all(tmp / f"ours-{name}"), load_all(tmp / f"mk-{name}")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_mergekit(zoo, tmp_path: Path, arch: str, case: str) -> None:
    ours, theirs = merge_both(CASES[case], zoo[arch], tmp_path, case)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=2e-6, atol=2e-6, msg=lambda m: f"{case} {arch} {name}: {m}")
    m1 = load_all(zoo[arch] / "m1")
    assert any(not torch.equal(ours[n], m1[n].float()) for n in ours if n in m1)  # not a copy of an input


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_mergekit_in_half_precision(f32_zoo: Path, tmp_path: Path, case: str) -> None:
    """`dtype: bfloat16` / `float16` on float32 inputs: mergekit's bytes exactly. (mergekit
    writes arcee_fusion's and ramplus_tl's results in float32, its float32 mask having promoted
    them; we write `dtype`, and their values rounded to it are ours.)"""
    for dtype in ("bfloat16", "float16"):
        cfg = {**CASES[case], "dtype": dtype}
        ours, theirs = merge_both(cfg, f32_zoo, tmp_path, f"{case}-{dtype}", dtype=None)
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            assert ours[name].dtype == getattr(torch, dtype), name
            assert ulps(ours[name], theirs[name].to(ours[name].dtype)) == 0, f"{case} {dtype} {name}"


STOCHASTIC = {"dare_linear": {}, "della": {"epsilon": 0.3}, "della_linear": {"epsilon": 0.3}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", list(STOCHASTIC))
def test_random_masks_match_mergekit_statistically(zoo, tmp_path: Path, method: str, dtype: str) -> None:
    """DARE's and DELLA's masks are random (mergekit draws from torch's global RNG, we seed per
    tensor): the share of each task vector kept and the merged change's norm agree, in every
    compute dtype; DELLA keeps larger |delta| more often, DARE does not, on both sides."""
    root = zoo["llama"]
    cfg = {"merge_method": method, "base_model": "base", "parameters": {"rescale": False}, "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.4, **STOCHASTIC[method]}}]}
    ours, theirs = merge_both(cfg, root, tmp_path, method, dtype=dtype)
    base, m1 = load_all(root / "base"), load_all(root / "m1")
    stats = {}
    for side, merged in (("ours", ours), ("mk", theirs)):
        kept = total = 0
        top = top_total = 0
        norm2 = 0.0
        for name, value in merged.items():
            delta, change = m1[name].float() - base[name].float(), value - base[name].float()
            keep = change != 0
            kept, total = kept + int(keep.sum()), total + keep.numel()
            big = delta.abs() >= delta.abs().median()
            top, top_total = top + int((keep & big).sum()), top_total + int(big.sum())
            norm2 += float(change.square().sum())
            if dtype == "float32":
                assert torch.equal(change[keep], delta[keep])  # kept values are the model's, unscaled
        stats[side] = (kept / total, top / top_total, norm2 ** 0.5)
    (share, top_share, norm), (mk_share, mk_top, mk_norm) = stats["ours"], stats["mk"]
    assert abs(share - 0.4) < 0.02 and abs(mk_share - 0.4) < 0.02, stats
    if method.startswith("della"):
        assert top_share > share + 0.05 and mk_top > mk_share + 0.05, stats
    else:
        assert abs(top_share - share) < 0.03 and abs(mk_top - mk_share) < 0.03, stats
    assert abs(norm / mk_norm - 1) < 0.05, stats


def test_della_is_seeded_per_tensor(zoo, tmp_path: Path) -> None:
    root = zoo["qwen2"]
    cfg = {"merge_method": "della", "base_model": "base", "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "m2", "parameters": {"weight": 1.0, "density": 0.5}}]}
    (root / "della_seed.yaml").write_text(yaml.safe_dump(cfg))
    for out, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_merge(MergeSpec.load(root / "della_seed.yaml", seed=seed), tmp_path / out, ExecOptions())
    a, b, c = load_all(tmp_path / "a"), load_all(tmp_path / "b"), load_all(tmp_path / "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    changed = [n for n in a if not torch.equal(a[n], c[n])]
    assert len(changed) >= 0.9 * len(a), (len(changed), len(a))  # another seed: other masks
    # The stream is (seed, tensor name)'s own: same-shape tensors draw differently, a name the same.
    from simmerge_ray.merge.tensor_merge import tensor_generator

    draw = lambda seed, name: torch.rand(1000, generator=tensor_generator(seed, name))  # noqa: E731
    assert torch.equal(draw(7, "model.layers.0.mlp.up_proj.weight"), draw(7, "model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(draw(7, "model.layers.0.mlp.up_proj.weight"), draw(7, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(draw(7, "model.layers.0.mlp.up_proj.weight"), draw(8, "model.layers.0.mlp.up_proj.weight"))
