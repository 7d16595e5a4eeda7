"""How much computing in half precision changes a merge (docs/merge.md: what `dtype` means).

On tiny bf16 llama checkpoints (4 layers, hidden 64: base + three fine-tune-like variants), each
method's config is merged twice: without `dtype`, so in the inputs' dtype (bf16) as mergekit
computes it, and with `--compute-dtype float32`; both write bf16. Prints, per method, the worst
tensor's difference relative to the tensor, ||bf16 - float32|| / ||float32||, and relative to
its merged change, ||bf16 - float32|| / ||float32 - base||, and the largest single element's
difference relative to that tensor's largest |value|. Seconds.

    python -m benchmarks.dtype_difference [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.executor import ExecOptions, run_merge

REPO = Path(__file__).resolve().parents[1]
THREE = [{"model": "m1"}, {"model": "m2"}, {"model": "m3"}]
WEIGHTED = [{"model": m, "parameters": {"weight": w}} for m, w in (("m1", 0.5), ("m2", 0.3), ("m3", 0.2))]
CONFIGS = {
    "ties (ties_example.yml)": {k: v for k, v in yaml.safe_load(
        (REPO / "tests/data/mergekit_configs/ties_example.yml").read_text()).items() if k != "dtype"},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": WEIGHTED},
    "linear": {"merge_method": "linear", "models": WEIGHTED},
    "slerp": {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": 0.4},
              "models": [{"model": "m1"}, {"model": "m2"}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": THREE},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5}, "models": THREE},
    "karcher": {"merge_method": "karcher", "models": THREE},
    "multislerp": {"merge_method": "multislerp", "base_model": "base", "models": WEIGHTED},
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def difference(half: dict, full: dict, base: dict) -> dict[str, float]:
    """The worst tensor's ||half - full|| / ||full||, ||half - full|| / ||full - base|| and
    max|half - full| / max|full|."""
    worst = {"relative_to_tensor": 0.0, "relative_to_change": 0.0, "largest_element_relative": 0.0}
    for name, h in half.items():
        h, f, b = h.float(), full[name].float(), base[name].float()
        gap = float((h - f).norm())
        for key, scale in (("relative_to_tensor", float(f.norm())), ("relative_to_change", float((f - b).norm())),
                           ("largest_element_relative", float(f.abs().max()))):
            value = (float((h - f).abs().max()) if key == "largest_element_relative" else gap) / scale if scale else 0.0
            worst[key] = max(worst[key], value)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON into this folder")
    args = parser.parse_args()
    spec = SyntheticSpec(architecture="llama", hidden_size=64, num_layers=4, num_heads=4, vocab_size=128,
                         intermediate_size=128, dtype="bfloat16")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_checkpoint(root / "base", spec)
        for i in (1, 2, 3):
            make_checkpoint(root / f"m{i}", dataclasses.replace(spec, seed=i), base=root / "base", delta_std=0.01)
        base = tensors(root / "base")
        for name, cfg in CONFIGS.items():
            path = root / "cfg.yaml"
            path.write_text(yaml.safe_dump(cfg))
            for mode, compute in (("half", None), ("full", "float32")):
                run_merge(MergeSpec.load(path), root / mode, ExecOptions(compute_dtype=compute, overwrite=True))
            d = results[name] = difference(tensors(root / "half"), tensors(root / "full"), base)
            print(f"{name:24s} worst tensor: {100 * d['relative_to_tensor']:6.3f}% of its norm, "
                  f"{100 * d['relative_to_change']:7.2f}% of its merged change; largest element "
                  f"{100 * d['largest_element_relative']:6.2f}% of the tensor's largest value", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dtype_difference.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
