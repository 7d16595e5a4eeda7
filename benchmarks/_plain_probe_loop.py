"""The plain single-process probe loop that bench_probe.py compares Ray Data against.

Run as a script it is what a user's own loop would be: a fresh interpreter that imports only
torch, transformers (through the hf back-end) and the same record extraction, loads the model,
and runs every probe. bench_probe.py times it from spawn to exit, and also calls `plain_loop`
inside its own warm process.

    python benchmarks/_plain_probe_loop.py MODEL_DIR PROBES.json BATCH_SIZE MAX_LENGTH   # prints JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


import torch

from simmerge_ray.inference.backend import load_backend
from simmerge_ray.inference.extract import pad_batch, probe_records
from simmerge_ray.inference.settings import ProbeSettings


def plain_loop(model_dir: Path, ids: list[list[int]], settings: ProbeSettings,
               batch_size: int) -> tuple[float, float]:
    """(total seconds, of which loading the model) for producing every probe's records,
    longest probes first as the pipeline batches them."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    backend = load_backend("hf", model_dir)
    loaded = time.perf_counter() - start
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    kept: list = []
    for s in range(0, len(order), batch_size):
        batch_ids, mask = pad_batch([list(ids[i]) for i in order[s:s + batch_size]])
        kept.extend(probe_records(backend.forward(batch_ids, mask), mask, settings))
    return time.perf_counter() - start, loaded


if __name__ == "__main__":
    model, probes_file, batch, max_length = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seconds, load_s = plain_loop(model, json.loads(probes_file.read_text()),
                                 ProbeSettings(max_length=max_length, attn_max_length=max_length), batch)
    print(json.dumps({"seconds": seconds, "load_s": load_s}))
