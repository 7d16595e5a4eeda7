"""The streaming executor: real Ray actors, worker loss, atomic output, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError, ConfigError, MergeError
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.io.safetensors_format import file_layout, read_header
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint, make_family, write_checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge
from simmerge_ray.merge.units import ShardPlan, plan_units
from simmerge_ray.merge.tensor_merge import check_finite

from merge_faults import crash_once

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_family(tmp_path_factory.mktemp("models"), SPEC)
    make_checkpoint(root / "wide", dataclasses.replace(SPEC, hidden_size=48, seed=3))
    make_checkpoint(root / "qwen", dataclasses.replace(SPEC, architecture="qwen2", seed=4))
    return root


def _config(root: Path, name: str, cfg: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


DARE = {"merge_method": "dare_ties", "base_model": "base", "dtype": "bfloat16",
        "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "m2", "parameters": {"weight": 0.4, "density": 0.5}}]}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_output_loads_in_transformers(ray_cluster, models: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _config(models, "lin", {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 1.0}}]})
    res = run_merge(MergeSpec.load(cfg), tmp_path / "out", ExecOptions(workers=2, shard_bytes=15_000))
    assert res.shards > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    # the loaded weights are the average of the inputs
    m1, m2 = Checkpoint.open(models / "m1"), Checkpoint.open(models / "m2")
    name = "model.layers.1.mlp.down_proj.weight"
    want = ((m1.read_f32(name) + m2.read_f32(name)) / 2).to(torch.bfloat16).float()
    assert torch.equal(model.state_dict()[name], want)


def test_worker_count_and_crash_do_not_change_bytes(ray_cluster, models: Path, tmp_path: Path) -> None:
    cfg = _config(models, "dare", DARE)
    opts = ExecOptions(placement="ray", workers=2, shard_bytes=15_000)
    run_merge(MergeSpec.load(cfg, seed=7), tmp_path / "one", dataclasses.replace(opts, placement="local", workers=1))
    run_merge(MergeSpec.load(cfg, seed=7), tmp_path / "two", opts)
    marker = tmp_path / "crashed"
    res = run_merge(MergeSpec.load(cfg, seed=7), tmp_path / "crash",
                    dataclasses.replace(opts, worker_cls=crash_once(marker)))
    assert marker.exists(), "the fault was not injected"
    assert res.shards >= 3
    run_merge(MergeSpec.load(cfg, seed=7), tmp_path / "local", dataclasses.replace(opts, placement="local", workers=2))
    one = _bytes(tmp_path / "one")
    assert one == _bytes(tmp_path / "two") == _bytes(tmp_path / "crash") == _bytes(tmp_path / "local")
    run_merge(MergeSpec.load(cfg, seed=8), tmp_path / "seed8", dataclasses.replace(opts, placement="local"))
    assert _bytes(tmp_path / "seed8") != one  # the seed matters


def test_tensors_split_across_workers_give_the_same_bytes(ray_cluster, models: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Linear and task arithmetic cut large tensors into element ranges written by different
    workers at their offsets in one shard; the file equals the single-worker one, crash or not."""
    cfg = _config(models, "ta", {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "bfloat16",
                                 "models": [{"model": "m1", "parameters": {"weight": 0.7}},
                                            {"model": "m2", "parameters": {"weight": 0.5}}]})
    one = run_merge(MergeSpec.load(cfg), tmp_path / "one", ExecOptions(workers=1, shard_bytes=10**9))
    split = ExecOptions(placement="ray", workers=3, shard_bytes=10**9, unit_elems=700, chunk_elems=256)
    res = run_merge(MergeSpec.load(cfg), tmp_path / "split", split)
    assert one.shards == res.shards == 1 and one.units == 1 and res.units > 10
    assert len({u["pid"] for u in res.per_unit}) == 3  # every worker wrote part of the one file
    assert any(u["pieces"] > 1 for u in res.per_unit)  # units also gather several small tensors
    marker = tmp_path / "crashed"
    run_merge(MergeSpec.load(cfg), tmp_path / "crash", dataclasses.replace(split, worker_cls=crash_once(marker)))
    assert marker.exists(), "the fault was not injected"
    threads = torch.get_num_threads()
    local = run_merge(MergeSpec.load(cfg), tmp_path / "local", dataclasses.replace(split, placement="local"))
    assert torch.get_num_threads() == threads  # the local merge leaves the caller's torch as it was
    assert {u["pid"] for u in local.per_unit} == {os.getpid()}
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "split") == _bytes(tmp_path / "crash") == _bytes(tmp_path / "local")
    assert res.bytes_read == one.bytes_read == 3 * Checkpoint.open(models / "m1").nbytes
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "cli")]) == 0  # local threads by default
    assert _bytes(tmp_path / "cli") == _bytes(tmp_path / "one")
    assert "input; 1 thread)" in capsys.readouterr().out  # one work unit (small models): one thread used


def test_work_units_cover_every_tensor_once() -> None:
    shards = [ShardPlan("a.safetensors", (("x", (10, 10), "BF16"), ("y", (5,), "F32"), ("z", (3, 4), "BF16"))),
              ShardPlan("b.safetensors", (("w", (250,), "BF16"),))]
    layouts = {s.file: file_layout(list(s.tensors)) for s in shards}
    split_units = [(40,), (40,), (20, 5, 12)] + [(40,)] * 6 + [(10,)]
    for can_split, want in ((True, split_units), (False, [(100,), (5, 12), (250,)])):
        units = plan_units(shards, layouts, lambda name, can=can_split: can, 40)
        assert [tuple(p.count for p in u.pieces) for u in units] == want
        for s in shards:
            for name, shape, code in s.tensors:
                pieces = sorted((p for u in units for p in u.pieces if p.name == name), key=lambda p: p.start)
                assert [p.start for p in pieces] == [sum(q.count for q in pieces[:i]) for i in range(len(pieces))]
                assert sum(p.count for p in pieces) == int(torch.tensor(shape).prod())
                assert all(p.offset == layouts[s.file].offsets[name] + p.start * (2 if code == "BF16" else 4)
                           for p in pieces)
        for u in units:  # a unit writes into one file only
            assert {p.name for p in u.pieces} <= {t[0] for s in shards if s.file == u.file for t in s.tensors}


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_mismatched_architectures_are_named(ray_cluster, models: Path, tmp_path: Path) -> None:
    for other, pattern in (("wide", r"model 'wide' .*tensor 'model\.embed_tokens\.weight' has shape \[64, 48\]"),
                           ("qwen", r"model 'qwen' .* extra tensor '.*q_proj\.bias'")):
        cfg = _config(models, f"bad-{other}", {"merge_method": "linear", "models": [
            {"model": "m1", "parameters": {"weight": 1}}, {"model": other, "parameters": {"weight": 1}}]})
        with pytest.raises(CheckpointError, match=pattern):
            run_merge(MergeSpec.load(cfg), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    # A tensor missing from one block of the first model (its other block holds it): the first
    # model's names are what is merged, so it was left out of the output, exit 0.
    src, gap = Checkpoint.open(models / "m1"), "model.layers.1.mlp.up_proj.weight"
    write_checkpoint(models / "gappy", src.config, [(n, e.shape, "bfloat16", lambda n=n: src.read_f32(n))
                                                    for n, e in src.entries.items() if n != gap], 10**9, overwrite=True)
    for method, extra in (("linear", {}), ("ties", {"base_model": "base"})):
        cfg = _config(models, "gappy", {"merge_method": method, **extra, "models": [
            {"model": m, "parameters": {"weight": 1, "density": 0.5} if method == "ties" else {"weight": 1}}
            for m in ("gappy", "m2")]})
        with pytest.raises(CheckpointError, match=rf"model 'gappy' \(.*\) lacks tensor '{gap}', which model 'm2' holds;"):
            run_merge(MergeSpec.load(cfg), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_nonfinite_result_fails_unless_allowed(ray_cluster, models: Path, tmp_path: Path) -> None:
    src = Checkpoint.open(models / "m1")
    poisoned = "model.layers.0.self_attn.o_proj.weight"

    def producer(name: str):
        def make() -> torch.Tensor:
            t = src.read_f32(name)
            if name == poisoned:
                t[0, 0] = float("inf")
            return t
        return make

    write_checkpoint(models / "inf", src.config, [(n, e.shape, "bfloat16", producer(n)) for n, e in src.entries.items()],
                     10**9, overwrite=True)
    cfg = _config(models, "nan", {"merge_method": "linear", "models": [
        {"model": "inf", "parameters": {"weight": 1}}, {"model": "m2", "parameters": {"weight": 1}}]})
    for placement in ("local", "ray"):  # the error names the input that holds the Inf
        with pytest.raises(MergeError, match=rf"merged tensor .{poisoned}. has 1 NaN/Inf values \(first at flat index 0;"
                                             rf".*; input '[^']*inf' \(.*tensor '{poisoned}'\) holds NaN/Inf there$"):
            run_merge(MergeSpec.load(cfg), tmp_path / "out", ExecOptions(workers=2, placement=placement))
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)
    run_merge(MergeSpec.load(cfg), tmp_path / "out", ExecOptions(allow_nonfinite=True))
    assert torch.isinf(Checkpoint.open(tmp_path / "out").read_f32(poisoned)).sum() == 1


@pytest.mark.parametrize("cfg, pattern", [
    ({"merge_method": "frobnicate", "models": [{"model": "m1"}]}, r"unknown method 'frobnicate'; known: .*ties"),
    ({"merge_method": "ties", "models": [{"model": "m1", "parameters": {"weight": 1}}]},
     r"merge_method 'ties' needs a base_model"),
    ({"merge_method": "linear", "models": [{"model": "m1", "parameters": {"weight": 1}},
                                           {"model": "m2", "parameters": {"weight": -1}}]},
     r"weights \[1.0, -1.0\] for tensor '.*' sum to zero"),
    ({"merge_method": "linear", "models": [{"model": "m1", "parameters": {"weight": 1}}], "mystery": 1},
     r"unsupported key 'mystery'"),
    ({"merge_method": "linear", "models": [{"model": "m1", "parameters": {"wieght": 1}}]},
     r"models\[0\].parameters: unknown parameter 'wieght' for linear"),
    ({"merge_method": "linear", "models": [{"model": "m1"}, {"model": "m2", "parameters": {"weight": 1}}]},
     r"model 'm1': missing parameter 'weight'"),
    ({"merge_method": "slerp", "base_model": "m1", "models": [{"model": "m1"}, {"model": "m2"}]},
     r"missing parameter 't' for slerp"),
    ({"merge_method": "linear", "models": [{"model": "nowhere", "parameters": {"weight": 1}}]},
     r"model 'nowhere' not found as a local path \(nothing is downloaded"),
    ({"merge_method": "linear", "dtype": "float12", "models": [{"model": "m1", "parameters": {"weight": 1}}]},
     r"dtype: unknown dtype 'float12'"),
    ({"merge_method": "linear", "out_dtype": "I8", "models": [{"model": "m1", "parameters": {"weight": 1}}]},
     r"out_dtype: 'I8' is not a float dtype; use one of bfloat16, float16, float32, float64"),
])
def test_bad_configs(ray_cluster, models: Path, tmp_path: Path, cfg: dict, pattern: str) -> None:
    path = _config(models, "bad", cfg)
    if "sum to zero" not in pattern:  # refused as the config is read
        with pytest.raises(ConfigError, match=pattern):
            MergeSpec.load(path)
        return
    spec = MergeSpec.load(path)  # weights are resolved per tensor: refused by the merge, leaving nothing
    with pytest.raises(ConfigError, match=pattern):
        run_merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_float64_output_is_written_with_its_config(ray_cluster, models: Path, tmp_path: Path) -> None:
    """out_dtype float64: every tensor stored as F64 and config.json saying so (it used to fail
    after the whole merge, on the config's dtype name)."""
    cfg = _config(models, "f64", {"merge_method": "linear", "dtype": "float64", "out_dtype": "float64",
                                  "models": [{"model": "m1", "parameters": {"weight": 1}},
                                             {"model": "m2", "parameters": {"weight": 1}}]})
    run_merge(MergeSpec.load(cfg), tmp_path / "out")
    ck = Checkpoint.open(tmp_path / "out")
    assert {e.dtype for e in ck.entries.values()} == {"F64"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float64"
    name = next(iter(ck.entries))
    want = (Checkpoint.open(models / "m1").read_f32(name).double() + Checkpoint.open(models / "m2").read_f32(name).double()) / 2
    torch.testing.assert_close(ck.read(name), want, rtol=1e-6, atol=1e-7)


def test_cli_refuses_existing_output_and_overwrites_on_request(ray_cluster, models: Path, tmp_path: Path,
                                                              capsys) -> None:
    cfg = _config(models, "cli", {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": 0.5},
                                  "models": [{"model": "m1"}, {"model": "m2"}]})
    out = tmp_path / "out"
    assert cli_main(["merge", str(cfg), "--out", str(out)]) == 0
    first = _bytes(out)
    assert cli_main(["merge", str(cfg), "--out", str(out)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert _bytes(out) == first
    assert cli_main(["merge", str(cfg), "--out", str(out), "--overwrite", "--shard-size", "16K"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 1
    for f in out.glob("*.safetensors"):
        read_header(f)  # every shard complete and valid
    # the index's total_size counts the tensors' bytes, headers excluded (as transformers and mergekit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == Checkpoint.open(out).nbytes
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("cfg", [
    {"merge_method": "linear", "models": [{"model": "m1", "parameters": {"weight": 0.3}},
                                          {"model": "m2", "parameters": {"weight": [0.2, 0.9]}}]},
    {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": [0.1, 0.8]},
     "models": [{"model": "m1"}, {"model": "m2"}]},
    {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
     "models": [{"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.7}}]},
], ids=["linear", "slerp", "task_arithmetic"])
def test_streamed_tensors_equal_whole_tensor_merges(ray_cluster, models: Path, tmp_path: Path, cfg: dict) -> None:
    """Tensors above the memory budget are merged chunk by chunk with the same result. SLERP
    merges a tensor whole within the budget, so its case compares whole against chunked; linear
    and task arithmetic always run the chunk loop (piece_routes.fused), so theirs compare odd
    300-element chunks against one chunk per tensor (the largest has 4,096 elements)."""
    path = _config(models, "stream", {**cfg, "out_dtype": "float32"})
    # In this process: streaming is the engine's unit function, the same in every placement.
    run_merge(MergeSpec.load(path), tmp_path / "whole", ExecOptions())
    res = run_merge(MergeSpec.load(path), tmp_path / "chunks",
                    ExecOptions(stream_bytes=1, chunk_elems=300))  # every tensor, odd chunks
    whole, chunks = Checkpoint.open(tmp_path / "whole"), Checkpoint.open(tmp_path / "chunks")
    for name in whole.tensor_names:
        torch.testing.assert_close(chunks.read(name), whole.read(name), rtol=1e-6, atol=1e-7)
    inputs = 2 + (cfg["merge_method"] == "task_arithmetic")
    passes = 2 if cfg["merge_method"] == "slerp" else 1  # SLERP's Gram pass reads the inputs again
    assert res.bytes_read == passes * inputs * Checkpoint.open(models / "m1").nbytes


@pytest.mark.parametrize("rescale", [False, True])
def test_streamed_ties_equals_whole_tensor_ties(ray_cluster, tmp_path: Path, rescale: bool) -> None:
    """TIES on tensors above the memory budget: two passes find each model's magnitude threshold,
    a third merges chunk by chunk. float32 checkpoints (distinct magnitudes, so no ties at the
    threshold): the same bytes as the whole-tensor merge, up to the l1 rescaling's summation
    order, and every input read three times (the threshold passes read them all together)."""
    f32 = dataclasses.replace(SPEC, dtype="float32")
    make_checkpoint(tmp_path / "base", f32)
    for i in (1, 2, 3):
        make_checkpoint(tmp_path / f"m{i}", dataclasses.replace(f32, seed=i), base=tmp_path / "base", delta_std=0.02)
    cfg = _config(tmp_path, "ties", {
        "merge_method": "ties", "base_model": "base", "parameters": {"rescale": rescale, "normalize": True},
        "models": [{"model": "m1", "parameters": {"weight": 0.6, "density": 0.3}},
                   {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}},
                   {"model": "m3", "parameters": {"weight": 0.4, "density": 1.0}}]})
    run_merge(MergeSpec.load(cfg), tmp_path / "whole", ExecOptions())
    res = run_merge(MergeSpec.load(cfg), tmp_path / "chunks", ExecOptions(workers=2, stream_bytes=1, chunk_elems=300))
    whole, chunks = Checkpoint.open(tmp_path / "whole"), Checkpoint.open(tmp_path / "chunks")
    for name in whole.tensor_names:
        if rescale:
            torch.testing.assert_close(chunks.read(name), whole.read(name), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(chunks.read(name), whole.read(name)), name
    assert res.bytes_read == 3 * 4 * Checkpoint.open(tmp_path / "m1").nbytes


def test_an_output_that_does_not_fit_fails_before_merging(models: Path, tmp_path: Path) -> None:
    """The output's blocks are reserved before any input is read: a file-size limit smaller than
    the merged shard (a real EFBIG from the kernel, as a full disk gives ENOSPC) ends the merge
    with one line naming the file, exit status 2, and nothing left behind."""
    cfg = _config(models, "fit", {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.5}}]})
    out = tmp_path / "merged"
    limit = Checkpoint.open(models / "m1").nbytes // 2
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from simmerge_ray.cli import main\n"
        f"sys.exit(main(['merge', {str(cfg)!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("simmerge merge: error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(r"model\.safetensors\.partial: cannot reserve \d+ bytes: File too large$", errors[0]), errors
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_finite_check_is_exact_when_the_sum_overflows() -> None:
    check_finite(torch.tensor([3e38, 3e38, -1.0]), "t", "linear")  # the sum is inf, every value finite
    with pytest.raises(MergeError, match=r"'t' has 2 NaN/Inf values \(first at flat index 1; linear\)"):
        check_finite(torch.tensor([1.0, float("nan"), float("-inf")]), "t", "linear")
    with pytest.raises(MergeError, match=r"1 NaN/Inf values among elements 100\.\.102 \(first at flat index 102;"):
        check_finite(torch.tensor([1.0, 2.0, float("inf")]), "t", "linear", offset=100)
