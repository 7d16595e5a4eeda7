"""Structural features: every value against a brute-force numpy computation, the cache's read
counts, and the errors on bad input. Checkpoints are tiny real bf16 safetensors folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError, ConfigError
from simmerge_ray.features import gram_kernel
from simmerge_ray.features.gram_math import FEATURES, GramAccumulator, PairStats, pair_features, raw_gram
from simmerge_ray.features.module_groups import GROUPS, depth_third, module_group
from simmerge_ray.features.structural import StructuralOptions, compute_structural, tensor_batches
from simmerge_ray.io.checkpoint import Checkpoint, layer_index
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint, make_config, write_checkpoint
from vocab_fixtures import extended_copy, with_tokenizer  # beside this file (the tests folder is on sys.path)

SPEC = SyntheticSpec(architecture="qwen2", hidden_size=32, num_layers=4, num_heads=4, vocab_size=64,
                     max_shard_bytes=24_000)  # several shards per model
OPTS = StructuralOptions(workers=1, chunk_elems=1000, precision="float64")  # chunks end mid-tensor; exact


def _spec(**kw) -> SyntheticSpec:
    return SyntheticSpec(**{**SPEC.__dict__, **kw})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, four fine-tune-like variants of it and one unrelated model."""
    root = tmp_path_factory.mktemp("zoo")
    make_checkpoint(root / "base", SPEC)
    for i in range(4):
        make_checkpoint(root / f"ft{i}", _spec(seed=10 + i), base=root / "base", delta_std=0.004 * (i + 1))
    make_checkpoint(root / "raw0", _spec(seed=100))
    return root


def _catalog(root: Path, models: list[str], base: str | None, name: str = "catalog.yaml") -> Catalog:
    lines = ([f"base: {base}"] if base else []) + ["models:"]
    lines += [f"  - {{name: {m}, path: {m}}}" for m in models]
    (root / name).write_text("\n".join(lines) + "\n")
    return Catalog.load(root / name)


# ---- brute force ------------------------------------------------------------------------------

def _flat(path: Path, tensors: list[str]) -> np.ndarray:
    ck = Checkpoint.open(path)
    return np.concatenate([ck.read(t).to(torch.float64).numpy().ravel() for t in tensors])


def _brute(root: Path, models: list[str], base: str | None, tensors: list[str]) -> dict[tuple[str, str], dict]:
    x = {m: _flat(root / m, tensors) for m in models}
    x0 = _flat(root / base, tensors) if base else None
    out = {}
    for a in models:
        for b in models:
            if a == b:
                continue
            na, nb = np.linalg.norm(x[a]), np.linalg.norm(x[b])
            l2 = np.linalg.norm(x[a] - x[b])
            f = {"weight_cos": x[a] @ x[b] / (na * nb), "l2": l2, "l2_rel": l2 / ((na + nb) / 2)}
            if x0 is not None:
                ta, tb = x[a] - x0, x[b] - x0
                sa, sb = np.linalg.norm(ta), np.linalg.norm(tb)
                prod = np.sign(ta) * np.sign(tb)
                f |= {"tv_cos": ta @ tb / (sa * sb), "tv_norm_a": sa, "tv_norm_b": sb, "tv_norm_ratio": sa / sb,
                      "sign_agree": (prod > 0).sum() / (prod != 0).sum()}
            out[(a, b)] = f
    return out


# (relative, absolute) per feature; float32 errors scale with the norms, so a cosine near 0 needs
# the absolute bound.
TOL = {"float64": (1e-9, 1e-12), "float32": (1e-5, 1e-7)}


def _assert_matches(df: pl.DataFrame, expect: dict, suffix: str, has_base: bool,
                    tol: tuple[float, float] = TOL["float64"]) -> None:
    rows = {(r["a"], r["b"]): r for r in df.iter_rows(named=True)}
    assert set(rows) == set(expect)
    for pair, want in expect.items():
        for f in FEATURES:
            got = rows[pair][f"s_{f}{suffix}"]
            if f in want:
                assert got == pytest.approx(want[f], rel=tol[0], abs=tol[1]), (pair, f, suffix)
            else:
                assert got is None and not has_base, (pair, f, suffix)


def _assert_gram(got: np.ndarray, want: np.ndarray, precision: str) -> None:
    """float64: relative 1e-12 per entry; float32: 1e-6 of the largest squared norm."""
    if precision == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-12)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.diag(want).max())


def _scopes(tensors: list[str], num_layers: int) -> dict[str, list[str]]:
    scopes = {"": tensors}
    for g in GROUPS:
        scopes[f"_{g}"] = [t for t in tensors if module_group(t) == g]
    for d in range(3):
        scopes[f"_d{d}"] = [t for t in tensors
                            if layer_index(t) is not None and depth_third(layer_index(t), num_layers) == d]
    return scopes


# ---- pure math --------------------------------------------------------------------------------

def test_module_groups_and_thirds() -> None:
    assert module_group("model.layers.3.self_attn.q_proj.weight") == "attn"
    assert module_group("model.layers.3.self_attn.q_norm.weight") == "norm"
    assert module_group("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_group("gpt_neox.layers.1.attention.query_key_value.bias") == "attn"
    assert module_group("gpt_neox.layers.1.mlp.dense_4h_to_h.weight") == "mlp"
    assert module_group("gpt_neox.final_layer_norm.bias") == "norm"
    assert module_group("model.embed_tokens.weight") == "embed"
    assert module_group("lm_head.weight") == "embed"
    assert module_group("model.rotary_emb.inv_freq") == "other"
    assert [depth_third(i, 6) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [depth_third(i, 3) for i in range(3)] == [0, 1, 2]
    assert [depth_third(i, 2) for i in range(2)] == [0, 2]
    with pytest.raises(ValueError):
        depth_third(4, 4)


PATHS = [("kernel", "float64"), ("kernel", "float32"), ("torch", "float64")]


@pytest.mark.parametrize("path,precision", PATHS)
@pytest.mark.parametrize("cols", [[0, 1, 2, 3, 4], [2], [1, 4]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
def test_accumulator_columns_equal_full_gram(path: str, precision: str, cols: list[int], dtype: torch.dtype) -> None:
    """Chunked accumulation of any column subset, on the fused kernel in either precision and on
    the torch path, equals numpy on the whole centred matrix; sign counts are exact everywhere.
    Chunks (700) and the tensor (2,501) end mid-block, and the reference is not the last row."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2501)) * np.array([[1.0], [1.0], [1.0], [1.0], [3.0]])
    ref = 3
    x[:, :300] = x[ref, :300]  # some task-vector coordinates exactly zero
    stored = torch.from_numpy(x).to(dtype)
    acc = GramAccumulator(5, ref, cols, signed=True, use_kernel=path == "kernel", precision=precision)
    assert acc.uses_kernel == (path == "kernel")  # the compiler is there: the kernel must build
    for s in range(0, 2501, 700):
        acc.add_parts([stored[i, s:s + 700] for i in range(5)])
    xs = stored.double().numpy()
    z = xs - xs[ref]
    z[ref] = xs[ref]
    gram, agree, disagree = acc.result()
    want = (z @ z.T)[:, cols]
    if precision == "float64":
        np.testing.assert_allclose(gram, want, rtol=1e-12)
    else:  # float32 products: error relative to the rows' norms
        norms = np.sqrt(np.outer(np.diag(z @ z.T), np.diag(z @ z.T)))[:, cols]
        assert np.abs(gram - want).max() / norms.max() < 1e-6
        assert np.abs(gram - want).max() > 0 or dtype == torch.float16  # it is float32 arithmetic
    sgn = np.sign(z)
    sgn[ref] = 0
    prod = sgn[:, None, :] * sgn[None, cols, :]
    np.testing.assert_array_equal(agree, (prod > 0).sum(-1))
    np.testing.assert_array_equal(disagree, (prod < 0).sum(-1))
    assert (agree + disagree).min() < 2201  # the zeroed coordinates were not counted


def test_raw_gram_from_centred() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 50))
    z = x - x[2]
    z[2] = x[2]
    assert raw_gram(z @ z.T, 2) == pytest.approx(x @ x.T, rel=1e-12)


def test_kernel_builds_once_into_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The binary is compiled once per (source, compiler, CPU) into SIMMERGE_KERNEL_DIR and
    reused; SIMMERGE_GRAM_KERNEL=0 turns the kernel off and the torch path takes over."""
    monkeypatch.setenv("SIMMERGE_KERNEL_DIR", str(tmp_path))
    gram_kernel.load.cache_clear()
    try:
        assert gram_kernel.load() is not None
        built = list(tmp_path.glob("gram_kernel-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob(".*"))  # no temporary left behind
        stamp = built[0].stat().st_mtime_ns
        gram_kernel.load.cache_clear()
        assert gram_kernel.load() is not None
        assert built[0].stat().st_mtime_ns == stamp
        monkeypatch.setenv("SIMMERGE_GRAM_KERNEL", "0")
        gram_kernel.load.cache_clear()
        assert gram_kernel.load() is None
        assert not GramAccumulator(3, 0, [0, 1, 2], signed=True).uses_kernel
    finally:
        gram_kernel.load.cache_clear()


@pytest.mark.parametrize("cols", [[0, 1, 2, 3, 4, 5, 6], [2, 5]])
def test_fused_bf16_blocks_equal_numpy(cols: list[int]) -> None:
    """Whole bf16 blocks take the fused path (values in even/odd order, packed sign masks counted
    in groups of 16 blocks); with one row stored as float32 the same values take the
    natural-order path. Both equal numpy, counts exactly, over chunks that fill mask groups and
    end mid-group and mid-block; a +0/-0 pair is a zero difference, counted as neither sign."""
    rng = np.random.default_rng(3)
    k, step, ref = 2 * 4096 + 3 * 256 + 77, 6000, 4
    x = torch.from_numpy(rng.standard_normal((7, k))).to(torch.bfloat16)
    x[:, :500] = x[ref, :500]
    x[1, 600:700], x[ref, 600:700] = 0.0, -0.0
    xs = x.double().numpy()
    z = xs - xs[ref]
    z[ref] = xs[ref]
    sgn = np.sign(z)
    sgn[ref] = 0
    prod = sgn[:, None, :] * sgn[None, cols, :]
    want = (z @ z.T)[:, cols]
    norms = np.sqrt(np.outer(np.diag(z @ z.T), np.diag(z @ z.T)))[:, cols]
    for parts in (list(x), [p.float() if i == 6 else p for i, p in enumerate(x)]):
        acc = GramAccumulator(7, ref, cols, signed=True, precision="float32")
        assert acc.uses_kernel
        for s in range(0, k, step):
            acc.add_parts([p[s:s + step] for p in parts])
        gram, agree, disagree = acc.result()
        np.testing.assert_array_equal(agree, (prod > 0).sum(-1))
        np.testing.assert_array_equal(disagree, (prod < 0).sum(-1))
        assert np.abs(gram - want).max() / norms.max() < 1e-6


def test_tensor_batches_balance_the_pool() -> None:
    """Every tensor goes to exactly one batch, largest first, about `per_worker` per worker; handed
    to whichever of 3 actors frees up first (time = bytes), the actors' loads differ by at most the
    largest batch."""
    rng = np.random.default_rng(4)
    size = {f"t{i}": int(s) for i, s in enumerate(rng.integers(1, 1000, 200))}
    size["big"] = 5000
    batches = tensor_batches(list(size), size, n_workers=3, per_worker=8)
    flat = [t for batch in batches for t in batch]
    assert sorted(flat) == sorted(size) and flat[0] == "big"
    assert [size[t] for t in flat] == sorted(size.values(), reverse=True)
    assert 20 <= len(batches) <= 25
    load = [0, 0, 0]
    for batch in batches:
        load[load.index(min(load))] += sum(size[t] for t in batch)
    assert max(load) - min(load) <= max(sum(size[t] for t in b) for b in batches)
    assert tensor_batches(["a"], {"a": 10}, n_workers=2) == [["a"]]


def test_portable_kernel_build_gives_the_same_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built without -march=native (no AVX: the scalar sign masks, no fused bf16 path), the
    kernel gives the float64 Gram and the exact sign counts of the torch path."""
    monkeypatch.setenv("SIMMERGE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(gram_kernel, "FLAGS", ("-O2", "-fPIC", "-shared", "-std=gnu11"))
    gram_kernel.load.cache_clear()
    try:
        rng = np.random.default_rng(2)
        x = torch.from_numpy(rng.standard_normal((7, 9013))).to(torch.bfloat16)  # 2 groups of sign masks and more
        x[:, :100] = x[6, :100]
        results = []
        for use_kernel, precision in ((True, "float32"), (True, "float64"), (False, "float64")):
            acc = GramAccumulator(7, 6, list(range(7)), signed=True, use_kernel=use_kernel, precision=precision)
            assert acc.uses_kernel == use_kernel
            acc.add_parts(list(x))
            results.append(acc.result())
        for got in results[:2]:
            np.testing.assert_array_equal(got[1], results[2][1])
            np.testing.assert_array_equal(got[2], results[2][2])
        np.testing.assert_allclose(results[1][0], results[2][0], rtol=1e-12)
        np.testing.assert_allclose(results[0][0], results[2][0], rtol=0, atol=1e-6 * np.diag(results[2][0]).max())
    finally:
        gram_kernel.load.cache_clear()


def test_bad_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="precision: expected one of float32, float64, got 'float16'"):
        StructuralOptions(precision="float16")
    with pytest.raises(ConfigError, match="chunk_elems: expected a positive count, got 0"):
        StructuralOptions(chunk_elems=0)
    with pytest.raises(ValueError, match="precision"):
        GramAccumulator(3, 0, [0], signed=False, precision="half")


def test_pair_features_undefined_are_nan() -> None:
    """A model equal to the base has no task-vector direction: NaN, never Inf or 0."""
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [1.0, 2.0, 3.0]])  # row 3 = base
    z = x - x[3]
    z[3] = x[3]
    sgn = np.sign(z)
    sgn[3] = 0
    prod = sgn[:, None, :] * sgn[None, :, :]
    stats = PairStats(z @ z.T, (prod > 0).sum(-1), (prod < 0).sum(-1))
    f = pair_features(stats, ref=3, n_models=3, has_base=True)
    assert np.isnan(f["tv_cos"][0, 2]) and np.isnan(f["sign_agree"][0, 2]) and np.isnan(f["tv_norm_ratio"][2, 0])
    assert f["tv_norm_ratio"][0, 2] == 0.0
    assert f["l2"][0, 2] == pytest.approx(np.sqrt(5.0))
    assert f["weight_cos"][0, 1] == pytest.approx(1.0)


# ---- the pass against brute force ---------------------------------------------------------------

@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_features_with_base_equal_brute_force(ray_cluster, zoo: Path, tmp_path: Path, precision: str) -> None:
    models = ["ft0", "ft1", "ft2"]
    run = compute_structural(_catalog(zoo, models, "base"), tmp_path / "out",
                             StructuralOptions(workers=2, chunk_elems=1000, precision=precision))  # two actors
    tol = TOL[precision]
    ck = Checkpoint.open(zoo / "ft0")
    tensors = sorted(ck.entries)
    df = pl.read_parquet(tmp_path / "out" / "structural.parquet")
    assert df.height == 6 and all(c.startswith("s_") for c in df.columns[2:])
    assert all(df.schema[c] == pl.Float64 for c in df.columns[2:])
    for suffix, scope in _scopes(tensors, ck.num_layers).items():
        assert scope, suffix
        _assert_matches(df, _brute(zoo, models, "base", scope), suffix, True, tol)
    # Per-layer long table: one row per ordered pair and layer.
    layers = pl.read_parquet(tmp_path / "out" / "structural_layers.parquet")
    assert layers.height == 6 * ck.num_layers
    for layer in range(ck.num_layers):
        expect = _brute(zoo, models, "base", [t for t in tensors if layer_index(t) == layer])
        _assert_matches(layers.filter(pl.col("layer") == layer), expect, "", True, tol)
    assert layers.filter(pl.col("layer") == 3)["rel_depth"][0] == pytest.approx(3.5 / 4)
    # Per-tensor raw Gram matrices: models in catalog order, then the base.
    grams = load_file(tmp_path / "out" / "gram.safetensors")
    meta = json.loads((tmp_path / "out" / "gram_meta.json").read_text())
    assert meta["models"] == models and meta["base"] == "base" and set(grams) == set(tensors)
    t = "model.layers.2.mlp.up_proj.weight"
    x = np.stack([_flat(zoo / m, [t]) for m in models + ["base"]])
    _assert_gram(grams[t], x @ x.T, precision)
    assert meta["tensors"][t] == {"numel": x.shape[1], "shape": [128, 32], "group": "mlp", "layer": 2, "third": 1}
    # Each byte of each checkpoint read exactly once.
    for name in models + ["base"]:
        assert run.bytes_read[name] == Checkpoint.open(zoo / name).nbytes
        assert run.tensor_reads[name] == len(tensors)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_features_without_base_equal_brute_force(ray_cluster, zoo: Path, tmp_path: Path, precision: str) -> None:
    models = ["ft1", "raw0", "ft0"]  # near-identical fine-tunes and an unrelated model, no base
    compute_structural(_catalog(zoo, models, None), tmp_path / "out",
                       StructuralOptions(workers=1, chunk_elems=1000, precision=precision))
    df = pl.read_parquet(tmp_path / "out" / "structural.parquet")
    tensors = sorted(Checkpoint.open(zoo / "raw0").entries)
    for suffix, scope in _scopes(tensors, 4).items():
        _assert_matches(df, _brute(zoo, models, None, scope), suffix, False, TOL[precision])
    assert df["s_tv_cos"].null_count() == df.height  # no base: task-vector features are null
    grams = load_file(tmp_path / "out" / "gram.safetensors")
    x = np.stack([_flat(zoo / m, ["lm_head.weight"]) for m in models])
    _assert_gram(grams["lm_head.weight"], x @ x.T, precision)


# ---- cache ------------------------------------------------------------------------------------

def test_cache_computes_only_the_new_column(ray_cluster, zoo: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))  # start from an empty cache
    old, new = ["ft0", "ft1", "ft2"], "ft3"
    n_tensors = len(Checkpoint.open(zoo / "ft0").entries)
    nbytes = {m: Checkpoint.open(zoo / m).nbytes for m in old + [new, "base"]}
    first = compute_structural(_catalog(zoo, old, "base"), tmp_path / "one", OPTS)
    assert first.entries_computed == n_tensors * 4 * 4 and first.pairs_cached == 0

    second = compute_structural(_catalog(zoo, old + [new], "base", "c2.yaml"), tmp_path / "two", OPTS)
    # Only the new model's Gram column is computed (5 rows x 1 column per tensor) ...
    assert second.entries_computed == n_tensors * 5 * 1
    assert second.pairs_cached == 10  # the 4x4 upper triangle among old models and base
    # ... and every checkpoint, new or old, is read exactly once: the new model for its own
    # values, the others because its inner products with them need their values.
    assert second.bytes_read == {m: nbytes[m] for m in old + [new, "base"]}
    assert second.tensor_reads == {m: n_tensors for m in old + [new, "base"]}

    # Reordered and shrunk: everything comes from the cache, nothing is read.
    third = compute_structural(_catalog(zoo, [new, "ft1"], "base", "c3.yaml"), tmp_path / "three", OPTS)
    assert third.total_bytes_read == 0 and third.entries_computed == 0

    # Features assembled from cached and new entries are still exact.
    tensors = sorted(Checkpoint.open(zoo / "ft0").entries)
    two = pl.read_parquet(tmp_path / "two" / "structural.parquet")
    _assert_matches(two, _brute(zoo, old + [new], "base", tensors), "", True)
    _assert_matches(pl.read_parquet(tmp_path / "three" / "structural.parquet"),
                    _brute(zoo, [new, "ft1"], "base", tensors), "", True)


# ---- bad input --------------------------------------------------------------------------------

def test_too_few_models(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 models; the catalog has 1"):
        compute_structural(_catalog(zoo, ["ft0"], "base"), tmp_path / "o")
    (zoo / "empty.yaml").write_text("models: []\n")
    with pytest.raises(ConfigError, match="models: the list is empty"):  # refused as it is read
        Catalog.load(zoo / "empty.yaml")


def test_models_with_different_tensors(zoo: Path, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "wide", _spec(hidden_size=48, seed=3))
    make_checkpoint(tmp_path / "deep", _spec(num_layers=5, seed=4))
    headless = make_checkpoint(tmp_path / "headless", _spec(tie_word_embeddings=True, seed=5))
    config = json.loads((headless / "config.json").read_text())  # no head, and no tie to explain it
    (headless / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    for m in ("ft0", "ft1"):
        (tmp_path / m).symlink_to(zoo / m)
    cat = _catalog(tmp_path, ["ft0", "ft1", "wide", "deep", "headless"], None)
    with pytest.raises(CheckpointError) as err:
        compute_structural(cat, tmp_path / "o")
    msg = str(err.value)
    assert "model 'wide'" in msg and "of 'model.embed_tokens.weight' is [64, 48] not [64, 32]" in msg
    assert "model 'deep'" in msg and "has extra 'model.layers.4." in msg
    assert "model 'ft1'" not in msg
    assert "model 'headless'" in msg and "(a head tied to the embeddings on one side? config.json tie_word_embeddings)" in msg
    assert msg.count("tie_word_embeddings") == 1  # the hint only where a head is missing or extra


def test_a_tied_head_is_compared_as_its_embedding(ray_cluster, zoo: Path, tmp_path: Path) -> None:
    """A model that ties its head (no lm_head.weight on disk) beside models that store one: its
    head is its embedding, as `merge` reads it, so its features equal those of an untied twin
    storing that embedding as its head."""
    tied = make_checkpoint(tmp_path / "tied", _spec(tie_word_embeddings=True, seed=7), base=zoo / "base",
                           delta_std=0.004)
    ck = Checkpoint.open(tied)
    assert ck.tied_head == "lm_head.weight" and "lm_head.weight" not in ck.entries
    tensors = {n: ck.read(n) for n in ck.entries} | {"lm_head.weight": ck.read("model.embed_tokens.weight")}
    write_checkpoint(tmp_path / "twin", {**ck.config, "tie_word_embeddings": False},
                     [(n, tuple(t.shape), ck.entries[ck.stored_name(n)].dtype, lambda t=t: t)
                      for n, t in tensors.items()], 10**9)
    for m in ("ft0", "ft1", "base"):
        (tmp_path / m).symlink_to(zoo / m)
    got = [pl.read_parquet(compute_structural(_catalog(tmp_path, ["ft0", "ft1", m], "base", f"{m}.yaml"),
                                              tmp_path / f"out-{m}", OPTS).out / "structural.parquet")
           for m in ("tied", "twin")]
    named = got[1].with_columns(pl.col(c).replace("twin", "tied") for c in ("a", "b"))
    assert got[0].height == 6 and got[0].equals(named)


@pytest.fixture
def vocab_zoo(tmp_path: Path) -> Path:
    """A base and two fine-tunes with the base's 64-token vocabulary (tokenizers saved), and
    `ext`: `ft1` with two chat tokens added and its embedding and head padded to 72 rows."""
    make_checkpoint(tmp_path / "base", SPEC)
    for i in range(2):
        make_checkpoint(tmp_path / f"ft{i}", _spec(seed=20 + i), base=tmp_path / "base", delta_std=0.004 * (i + 1))
    for m in ("base", "ft0", "ft1"):
        with_tokenizer(tmp_path / m)
    extended_copy(tmp_path / "ft1", tmp_path / "ext", rows=72)
    return tmp_path


def test_an_extended_vocabulary_is_compared_on_the_shared_rows(ray_cluster, vocab_zoo: Path) -> None:
    """A fine-tune that added tokens and padded its embedding is compared with the others on
    the 64 ids they share, so its features equal, exactly, those of the model it extends."""
    root = vocab_zoo
    got = {m: pl.read_parquet(compute_structural(_catalog(root, ["ft0", m], "base", f"{m}.yaml"), root / f"out-{m}",
                                                 OPTS).out / "structural.parquet") for m in ("ext", "ft1")}
    named = got["ext"].with_columns(pl.col(c).replace("ext", "ft1") for c in ("a", "b"))
    assert got["ft1"].height == 2 and named.equals(got["ft1"])
    meta = json.loads((root / "out-ext" / "gram_meta.json").read_text())["tensors"]
    assert meta["model.embed_tokens.weight"]["shape"] == [64, 32] and meta["lm_head.weight"]["numel"] == 64 * 32


def test_vocabularies_that_disagree_on_a_shared_id_are_refused(vocab_zoo: Path) -> None:
    root = vocab_zoo
    with_tokenizer(root / "ft0", swap=(5, 9))
    with pytest.raises(CheckpointError, match=r"map token id 5 to 'w6' and 'w2': neither vocabulary extends the other"):
        compute_structural(_catalog(root, ["ft0", "ext"], "base"), root / "o", OPTS)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "ft0" / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"model 'ft0' \(.*\): its vocab_size \(64\) differs from the other "
                                              r"models' and it has no tokenizer files"):
        compute_structural(_catalog(root, ["ft0", "ext"], "base"), root / "o", OPTS)


def test_base_of_another_architecture(zoo: Path, tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "neox", _spec(architecture="gpt_neox"))
    for m in ("ft0", "ft1"):
        (tmp_path / m).symlink_to(zoo / m)
    with pytest.raises(CheckpointError, match=r"the base \(.*neox\) is a 'gpt_neox' checkpoint but model 'ft0' \(.*\) is 'qwen2'"):
        compute_structural(_catalog(tmp_path, ["ft0", "ft1"], "neox"), tmp_path / "o")


@pytest.mark.parametrize("value, needle", [
    (float("nan"), "holds NaN or Inf values in model 'poisoned'"),
    # finite in bf16, but its square overflows a float32 Gram (was reported as NaN or Inf)
    (1e30, "in model 'poisoned' (POISONED) is finite but its products overflow float32 (largest |value| 1e+30); "
           "rerun with --precision float64"),
])
def test_nan_tensor_is_reported_by_name(ray_cluster, zoo: Path, tmp_path: Path, value: float, needle: str) -> None:
    src = Checkpoint.open(zoo / "ft1")
    bad = "model.layers.1.self_attn.k_proj.weight"

    def producer(name: str):
        def make() -> torch.Tensor:
            t = src.read_f32(name)
            if name == bad:
                t.view(-1)[17] = value
            return t
        return make

    write_checkpoint(tmp_path / "poisoned", make_config(SPEC),
                     [(n, e.shape, "bfloat16", producer(n)) for n, e in src.entries.items()], 10**9)
    (tmp_path / "ft0").symlink_to(zoo / "ft0")
    (tmp_path / "base").symlink_to(zoo / "base")
    catalog = _catalog(tmp_path, ["ft0", "poisoned"], "base")
    with pytest.raises(CheckpointError) as err:
        compute_structural(catalog, tmp_path / "o", StructuralOptions(workers=1, chunk_elems=1000, precision="float32"))
    assert str(err.value).startswith(f"tensor '{bad}' ")
    assert needle.replace("POISONED", str(tmp_path / "poisoned")) in str(err.value)
    assert not (tmp_path / "o").exists()
    if value == value:  # finite: float64 products hold it, as the error says
        compute_structural(catalog, tmp_path / "o", OPTS)
        assert (tmp_path / "o" / "structural.parquet").is_file()


# ---- command line -----------------------------------------------------------------------------

def test_cli_structural(ray_cluster, zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cat = _catalog(zoo, ["ft0", "ft3"], "base", "cli.yaml")
    out = tmp_path / "feat"
    assert cli_main(["features", "structural", "--catalog", str(cat.source), "--out", str(out), "--workers", "1"]) == 0
    assert pl.read_parquet(out / "structural.parquet").height == 2
    assert "2 models" in capsys.readouterr().out
    assert cli_main(["features", "structural", "--catalog", str(cat.source), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --precision float64 reaches the kernel: the Gram matrices are exact, float32's are not.
    t = "model.layers.2.mlp.up_proj.weight"
    x = np.stack([_flat(zoo / m, [t]) for m in ["ft0", "ft3", "base"]])
    for precision, exact in (("float64", True), ("float32", False)):
        assert cli_main(["features", "structural", "--catalog", str(cat.source), "--out", str(out), "--overwrite",
                         "--no-cache", "--precision", precision]) == 0
        got = load_file(out / "gram.safetensors")[t]
        assert np.allclose(got, x @ x.T, rtol=1e-12, atol=0) == exact, precision
        _assert_gram(got, x @ x.T, precision)


# ---- a features folder shared with the functional stage, and a cache that heals ---------------

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_structural_overwrite_keeps_the_functional_stage_and_probe_cache(ray_cluster, zoo: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """The README's layout: both stages to one `feats/`; `structural --overwrite` replaces only
    its own files and rewrites the join, the functional table and the probe cache stay as they are."""
    from simmerge_ray.features.functional import FUNCTIONAL_COLUMNS, SCHEMA
    from simmerge_ray.io.stage_files import stage_files

    cat = _catalog(zoo, ["ft0", "ft1", "ft3"], "base", "shared.yaml")
    feats = tmp_path / "feats"
    names = ["ft0", "ft1", "ft3"]
    rows = [{"a": a, "b": b, "task": "code", **{c: float(i) for i, c in enumerate(FUNCTIONAL_COLUMNS)}}
            for a in names for b in names if a != b]
    with stage_files(feats, "functional", ("functional.parquet",), replace=True) as tmp:
        pl.DataFrame(rows, schema=SCHEMA, orient="row").write_parquet(tmp / "functional.parquet")
    (feats / "probe_cache" / "key").mkdir(parents=True)
    (feats / "probe_cache" / "key" / "chunk-r-00000.safetensors").write_bytes(b"expensive probe outputs")
    (feats / "notes.txt").write_text("mine")
    kept = {k: v for k, v in _tree(feats).items() if k in ("functional.parquet", "notes.txt",
                                                           ".simmerge-stage-functional.json")
            or k.startswith("probe_cache")}
    argv = ["features", "structural", "--catalog", str(cat.source), "--out", str(feats), "--workers", "1"]
    assert cli_main(argv) == 0
    first = pl.read_parquet(feats / "features.parquet")
    assert first.height == 6 and "s_weight_cos" in first.columns and "f_kl_ab_mean" in first.columns
    assert cli_main(argv) == 2
    assert "structural.parquet: output already exists (pass --overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite", "--no-cache"]) == 0
    assert {k: v for k, v in _tree(feats).items() if k in kept} == kept
    again = pl.read_parquet(feats / "features.parquet")  # recomputed: float32 products, same to ~1e-7
    assert again.columns == first.columns and again.select("a", "b", "task").equals(first.select("a", "b", "task"))
    assert np.allclose(again.select(pl.col(pl.Float64)).to_numpy(), first.select(pl.col(pl.Float64)).to_numpy(),
                       rtol=1e-5, atol=1e-7, equal_nan=True)
    assert not [p for p in feats.iterdir() if ".tmp-" in p.name]


def test_structural_refuses_to_replace_a_file_it_did_not_write(zoo: Path, tmp_path: Path, capsys) -> None:
    cat = _catalog(zoo, ["ft0", "ft1"], "base", "user.yaml")
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "gram.safetensors").write_bytes(b"the user's own file")
    argv = ["features", "structural", "--catalog", str(cat.source), "--out", str(feats), "--overwrite"]
    assert cli_main(argv) == 2  # refused before Ray starts
    assert "gram.safetensors: not written by simmerge" in capsys.readouterr().err
    assert _tree(feats) == {"gram.safetensors": b"the user's own file"}


def test_truncated_gram_cache_entries_are_misses_and_healed(ray_cluster, zoo: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from simmerge_ray.features.gram_cache import load_entry

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    cat = _catalog(zoo, ["ft0", "ft2"], "base", "heal.yaml")
    compute_structural(cat, tmp_path / "one", OPTS)
    entries = sorted((tmp_path / "cache" / "structural").rglob("*.safetensors"))
    assert len(entries) == 6  # 3 rows (2 models + base): 6 unordered pairs
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # truncated mid-header
    data = bytearray(entries[1].read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the values: caught by the digest
    entries[1].write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        run = compute_structural(cat, tmp_path / "two", OPTS)
    assert run.pairs_cached == 4 and run.entries_computed > 0
    assert str(entries[0]) in caplog.text and str(entries[1]) in caplog.text and "digest mismatch" in caplog.text
    assert all(load_entry(e) is not None for e in entries)  # rewritten whole
    assert pl.read_parquet(tmp_path / "two" / "structural.parquet").equals(
        pl.read_parquet(tmp_path / "one" / "structural.parquet"))


def test_gram_cache_entries_rewritten_without_their_digest_are_misses_and_healed(
        ray_cluster, zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A cache entry that is still valid safetensors but holds other values (sign counts made
    impossible, saved without the digest) was served: s_sign_agree of its pair came out near 0."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from simmerge_ray.features.gram_cache import load_entry

    monkeypatch.setenv("SIMMERGE_CACHE", str(tmp_path / "cache"))
    cat = _catalog(zoo, ["ft1", "ft3"], "base", "values.yaml")
    compute_structural(cat, tmp_path / "one", OPTS)
    entries = sorted(e for e in (tmp_path / "cache" / "structural").rglob("*.safetensors")
                     if len(set(e.stem.split("__"))) == 2)  # pairs of two different rows
    assert len(entries) == 3  # 3 rows (2 models + base)
    fresh = {e: load_file(e) for e in entries}
    assert sorted(bool((a["agree"] > 0).all()) for a in fresh.values()) == [False, False, True]  # base: no signs
    for e, arrays in fresh.items():
        save_file({**arrays, "agree": np.full_like(arrays["agree"], -5)}, str(e))  # valid file, no digest
    with caplog.at_level("WARNING"):
        run = compute_structural(cat, tmp_path / "two", OPTS)
    assert run.pairs_cached == 3 and run.entries_computed > 0  # the three self-pairs only
    for e in entries:
        assert f"{e}: Gram cache entry has no digest" in caplog.text
        with safe_open(str(e), framework="np") as f:
            assert (f.metadata() or {}).get("digest")  # rewritten with its digest ...
        healed = load_entry(e)
        assert healed is not None and set(healed) == set(fresh[e])  # ... and the values computed again
        for k in fresh[e]:
            np.testing.assert_array_equal(healed[k], fresh[e][k])
    one, two = (pl.read_parquet(tmp_path / d / "structural.parquet") for d in ("one", "two"))
    assert two.equals(one)
    assert two["s_sign_agree"].is_between(0.0, 1.0).all()
