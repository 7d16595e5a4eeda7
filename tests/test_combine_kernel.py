"""The combination kernel: the torch path's bytes, and a linear merge that never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint, make_family
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, plan_merge, run_merge
from simmerge_ray.merge.operators import combine_native
from simmerge_ray.merge.piece_routes import PieceRoutes, open_inputs

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, m1, m2 in bf16, and m3 / m4: m1's and m2's family stored in float32 and float16."""
    root = make_family(tmp_path_factory.mktemp("combine"), SPEC)
    make_checkpoint(root / "m3", SyntheticSpec(**{**SPEC.__dict__, "seed": 3, "dtype": "float32"}),
                    base=root / "base", delta_std=0.05)
    make_checkpoint(root / "m4", SyntheticSpec(**{**SPEC.__dict__, "seed": 4, "dtype": "float16"}),
                    base=root / "base", delta_std=0.05)
    return root


@pytest.fixture
def kernel_switch() -> Iterator[None]:
    """Leaves the kernel on (its default) for the next test, whatever this one set."""
    yield
    os.environ.pop("SIMMERGE_COMBINE_KERNEL", None)
    combine_native.load.cache_clear()


def _merge(models: Path, out: Path, cfg: dict, *, kernel: bool) -> dict[str, bytes]:
    os.environ["SIMMERGE_COMBINE_KERNEL"] = "1" if kernel else "0"
    combine_native.load.cache_clear()
    path = models / "combine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # odd chunks: the kernel's block tails and the chunk loop's last partial chunk both occur
    run_merge(MergeSpec.load(path), out, ExecOptions(workers=2, chunk_elems=1000))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def _linear(models: list[str], weights: list[float], **extra) -> dict:
    return {"merge_method": "linear", **extra,
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]}


CASES = {
    "bf16": _linear(["m1", "m2", "base"], [0.3, 0.7, 0.0], dtype="bfloat16"),
    "stored-dtypes-promoted": _linear(["m1", "m3", "m2"], [0.5, 0.2, 0.4]),  # no dtype: float32 (bf16 + f32)
    "bf16-in-f32-compute": _linear(["m1", "m2"], [1.0, 2.0], dtype="bfloat16", out_dtype="float32"),
    "mixed-inputs-bf16-compute": _linear(["m1", "m3", "m4"], [0.5, 0.25, 0.25], dtype="bfloat16"),
    "mixed-inputs-fp16": _linear(["m3", "m4", "m2"], [0.2, 0.5, 0.3], dtype="float16"),
    "fp32-out-bf16": _linear(["m3", "m1"], [0.6, 0.4], dtype="float32", out_dtype="bfloat16"),
    "unnormalised-gradient": {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"normalize": False},
                              "models": [{"model": "m1", "parameters": {"weight": [0.1, 0.9]}},
                                         {"model": "m2", "parameters": {"weight": 0.8}}]},
    "task-arithmetic-fp32": {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                             "out_dtype": "bfloat16", "parameters": {"lambda": 0.9},
                             "models": [{"model": "m1", "parameters": {"weight": 0.7}},
                                        {"model": "m3", "parameters": {"weight": 0.6}}]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_gives_the_torch_paths_bytes(models: Path, tmp_path: Path, kernel_switch: None, case: str) -> None:
    native = _merge(models, tmp_path / "native", CASES[case], kernel=True)
    spec, opts = MergeSpec.load(models / "combine.yaml"), ExecOptions()
    plan = plan_merge(spec, opts)
    routes = PieceRoutes(spec, plan.tasks, open_inputs(spec), opts.stream_bytes, opts.chunk_elems)
    assert not routes.uses_torch(plan.units)  # every tensor went through the kernel
    reference = _merge(models, tmp_path / "torch", CASES[case], kernel=False)
    assert native and native == reference


def test_kernel_rounds_like_torch_on_hard_values() -> None:
    """Ties to even, values near bf16/fp16 limits, subnormals, signed zeros, a zero coefficient
    after the first, a divisor: the kernel against torch's op-by-op arithmetic, element by element."""
    lib = combine_native.load()
    assert lib is not None, "no C compiler: the kernel is what this test checks"
    rng = np.random.default_rng(0)
    k = 4099
    x32 = rng.standard_normal((3, k)).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 5, (3, k))
    x32[:, :8] = [[0.0, -0.0, 65504.0, 65519.0, 3.3895e38, 1e-45, 1.0 + 2**-8, -(1.0 + 3 * 2**-8)]] * 3
    coeffs = [0.7, 0.0, 1.3]
    for dt, compute, out_dt, divisor in [("F32", "F32", "BF16", 1.0), ("F32", "BF16", "BF16", 1.0),
                                         ("F32", "F16", "F16", 1.0), ("F32", "F32", "F32", 1.0),
                                         ("BF16", "F32", "F16", 1.0), ("F32", "BF16", "BF16", 2.0000002),
                                         ("BF16", "F16", "F16", 0.3), ("F32", "F32", "F32", 1.7)]:
        torch_in = torch.from_numpy(x32.copy()).to({"F32": torch.float32, "BF16": torch.bfloat16}[dt])
        # the torch path (UnitMerger._merge_combination / _write_chunk), zero terms after the first skipped
        tdt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        rounded = [t if compute == "F32" or t.dtype == tdt[compute] else t.to(tdt[compute]) for t in torch_in]
        acc = rounded[0].to(torch.float32).mul(coeffs[0])
        for c, t in zip(coeffs[1:], rounded[1:]):
            if c != 0:
                acc.add_(t.to(torch.float32), alpha=c)
        if divisor != 1.0:  # linear's normalisation, as mergekit's div_
            acc.div_(divisor)
        want = (acc if compute == "F32" else acc.to(tdt[compute])).to(tdt[out_dt])
        parts = [t.contiguous().view(torch.uint8).numpy() for t in torch_in]
        out = np.empty(k * (4 if out_dt == "F32" else 2), dtype=np.uint8)
        keep = [0, 2]
        bad, first = combine_native.combine(lib, [parts[j] for j in keep], [dt, dt], [coeffs[j] for j in keep],
                                            compute, out, out_dt, check=True, divisor=divisor)
        got = torch.from_numpy(out).view(tdt[out_dt])
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (dt, compute, out_dt, divisor)
        n_bad = int((~torch.isfinite(want)).sum())
        assert bad == n_bad and (first == int((~torch.isfinite(want)).nonzero()[0]) if n_bad else first == -1)


def test_a_linear_merge_never_imports_torch(models: Path, tmp_path: Path) -> None:
    """The merge command's linear path (config, headers, plan, kernel, output files) runs without
    torch: the 3-4 s import is what kept it from the I/O floor."""
    cfg = models / "nontorch.yaml"
    cfg.write_text(yaml.safe_dump(CASES["bf16"]))
    probe = ("import sys; from simmerge_ray.cli import main; rc = main(['merge', sys.argv[1], '--out', sys.argv[2], "
             "'--quiet']); print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SIMMERGE_COMBINE_KERNEL")}
    res = subprocess.run([sys.executable, "-c", probe, str(cfg), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch imported: False" in res.stdout
    assert (tmp_path / "out" / "model.safetensors").exists() or list((tmp_path / "out").glob("*.safetensors"))
