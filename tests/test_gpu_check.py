"""The GPU check's verdicts (benchmarks/gpu_check.py): its comparison passes identical records,
fails a difference over the float32 tolerance that TF32's allows, and refuses mismatched probes."""

from __future__ import annotations

import torch

from benchmarks.gpu_check import FP32, ROWS, TF32, compare_records


def _records(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p, t in enumerate((5, 9)):
        out[f"{p}/logp"] = torch.log_softmax(torch.randn(t, 16, generator=g), dim=-1)
        out[f"{p}/hidden"] = torch.randn(4, 8, generator=g)
        out[f"{p}/attn"] = torch.rand(4, t, t, generator=g)
    return out


def test_identical_records_pass_bitwise() -> None:
    ref = _records()
    got = compare_records({k: v.clone() for k, v in ref.items()}, ref, FP32)
    assert got["ok"] and got["bitwise_equal"] and got["top1_agreement"] == 1.0
    assert all(f["max_abs_diff"] == 0.0 for f in got["fields"].values())


def test_tf32_sized_error_fails_fp32_but_not_tf32() -> None:
    ref = _records()
    got = dict(ref, **{"1/hidden": ref["1/hidden"] + 5e-4})
    fp32 = compare_records(got, ref, FP32)
    assert not fp32["ok"] and not fp32["fields"]["hidden"]["ok"] and fp32["fields"]["logp"]["ok"]
    assert abs(fp32["fields"]["hidden"]["max_abs_diff"] - 5e-4) < 1e-6
    assert compare_records(got, ref, TF32)["ok"]


def test_missing_probe_is_an_error() -> None:
    ref = _records()
    got = {k: v for k, v in ref.items() if not k.startswith("1/")}
    result = compare_records(got, ref, FP32)
    assert not result["ok"] and "probe 1" in result["error"]


def test_every_row_compares_against_a_reference_run() -> None:
    variants = {r.variant for r in ROWS}
    assert {r.reference for r in ROWS} <= variants | {"hf-cpu"}


def test_only_the_tf32_rows_are_informative() -> None:
    """TF32 is measured, not promised: the back-ends pin IEEE float32, so every other row is a check."""
    assert {r.variant for r in ROWS if r.informative} == {"hf-cuda-tf32"}
