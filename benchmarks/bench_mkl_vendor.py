"""Benchmark: torch's MKL with and without simmerge_ray/mkl_vendor.c preloaded (what every process
of the demo and the tests gets through scripts/mkl_env.sh on CPUs MKL does not take for Intel's,
such as AMD's).

    .venv/bin/python -m benchmarks.bench_mkl_vendor            # 3 rounds, interleaved
    .venv/bin/python -m benchmarks.bench_mkl_vendor --rounds 1

Each measurement is a fresh process (the preload acts at process start): the default zoo's llama
(configs/zoo_default.yaml) trained with AdamW as the testbed trains its experts (1 thread, batch
8 x 128) and its pretraining (2 threads, batch 16 x 128), and its forward pass on batches of
32 x 96 tokens (1 thread, as a label actor scores). Prints tokens/s per row and the ratio, and
writes JSON. On an Intel CPU there is nothing to preload and the benchmark says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, time, torch, yaml
from simmerge_ray.mkl_vendor import libtorch_cpu
from simmerge_ray.testbed.model_factory import init_model
from simmerge_ray.testbed.train import train_lm
from simmerge_ray.testbed.zoo_config import TrainConfig, ZooConfig
kind, threads, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.use_deterministic_algorithms(True)
cfg = ZooConfig.model_validate(yaml.safe_load(open("configs/zoo_default.yaml")))
model = init_model(cfg.architecture, cfg.tokenizer.vocab_size, 1, 0, 0)
g = torch.Generator().manual_seed(0)
if kind == "train":
    blocks = torch.randint(2, cfg.tokenizer.vocab_size, (steps * batch, cfg.data.seq_len), generator=g)
    t0 = time.perf_counter()
    train_lm(model, blocks, TrainConfig(steps=steps, lr=1e-3, batch_size=batch, warmup_steps=5))
    tokens = blocks.numel()
else:
    x = torch.randint(2, cfg.tokenizer.vocab_size, (batch, 96), generator=g)
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
    tokens = steps * x.numel()
print(tokens / (time.perf_counter() - t0), libtorch_cpu().mkl_serv_cpu_detect())
"""
CASES = {  # name: (kind, threads, batch, steps)
    "expert fine-tune (1 thread, batch 8)": ("train", 1, 8, 80),
    "pretraining (2 threads, batch 16)": ("train", 2, 16, 60),
    "scoring forward pass (1 thread, 32 x 96)": ("infer", 1, 32, 40),
}


def measure(case: tuple[str, int, int, int], preload: str | None) -> tuple[float, int]:
    """(tokens per second, MKL dispatch code) of one fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | ({"LD_PRELOAD": preload} if preload else {})
    out = subprocess.run([sys.executable, "-c", _CHILD, *map(str, case)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="measurements per row and setting, interleaved")
    p.add_argument("--json", type=Path, default=REPO / "runs" / "bench" / "mkl_vendor.json")
    args = p.parse_args()
    from simmerge_ray.mkl_vendor import mkl_vendor_preload

    preload = mkl_vendor_preload()
    if preload is None:
        print("MKL already dispatches by instruction set on this CPU (or the preload is off): nothing to compare")
        return
    rows = []
    print(f"{'case':<42} {'MKL dispatch':>12} {'tokens/s':>10} {'preloaded':>12} {'tokens/s':>10} {'ratio':>6}")
    for name, case in CASES.items():
        plain, pre = [], []
        for _ in range(args.rounds):
            plain.append(measure(case, None))
            pre.append(measure(case, preload))
        a, b = statistics.median(r for r, _ in plain), statistics.median(r for r, _ in pre)
        rows.append({"case": name, "dispatch": plain[0][1], "tokens_per_s": a, "preloaded_dispatch": pre[0][1],
                     "preloaded_tokens_per_s": b, "ratio": b / a,
                     "samples": {"plain": [r for r, _ in plain], "preloaded": [r for r, _ in pre]}})
        print(f"{name:<42} {plain[0][1]:>12} {a:>10.0f} {pre[0][1]:>12} {b:>10.0f} {b / a:>6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"preload": preload, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
