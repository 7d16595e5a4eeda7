"""The streaming merge executor: output shards are work units spread over Ray actors.

Each actor opens the inputs' indexes (headers only), then for each tensor of its shard reads
that tensor from every input, merges it and appends it to its output file, so a worker holds a
couple of tensors at a time (the next one is prefetched while the current one is merged). The
driver only plans, validates, and writes the small files (index, config, tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from simmerge_ray.errors import CheckpointError, MergeError
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from simmerge_ray.io.side_files import copy_tokenizer
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, DTYPE_TO_TORCH, dtype_code
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.tensor_merge import merge_tensor

# Set by the fault-injection test: the first worker to reach its second unit exits abruptly
# (once, tracked by this marker file), to prove that a lost worker is retried cleanly.
CRASH_ONCE_ENV = "SIMMERGE_TEST_CRASH_ONCE"


@dataclass(frozen=True)
class ExecOptions:
    workers: int = 2
    cpus_per_worker: float = 1.0
    memory_per_worker: int | None = None  # bytes, a Ray scheduling hint
    shard_bytes: int = 512 * 1024**2
    # A tensor whose float32 working set (inputs + output) exceeds stream_bytes is merged in
    # chunks of chunk_elems elements, where the method allows (see MergeMethod.combination).
    stream_bytes: int = 256 * 1024**2
    chunk_elems: int = 8 * 1024**2
    allow_nonfinite: bool = False
    overwrite: bool = False
    max_retries: int = 3


@dataclass
class MergeResult:
    out: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    per_shard: list[dict] = field(default_factory=list)

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, out dtype code)


def open_inputs(spec: MergeSpec) -> tuple[dict[str, Checkpoint], Checkpoint | None]:
    """Open every input and check they hold the same tensor names and shapes."""
    ckpts = {m.ref: Checkpoint.open(m.path) for m in spec.inputs}
    base = None
    if spec.base is not None:
        base = ckpts.get(spec.base.ref) or Checkpoint.open(spec.base.path)
    ref_name, ref = next(iter(ckpts.items()))
    others = list(ckpts.items())[1:] + ([(spec.base.ref, base)] if base is not None and spec.base.ref not in ckpts else [])
    for name, ck in others:
        missing = [t for t in ref.entries if t not in ck.entries]
        extra = [t for t in ck.entries if t not in ref.entries]
        if missing or extra:
            what = f"lacks tensor {missing[0]!r}" if missing else f"has extra tensor {extra[0]!r}"
            hint = " (tied vs untied embeddings?)" if any("lm_head" in t or "embed_out" in t for t in missing + extra) else ""
            raise CheckpointError(
                f"model {name!r} ({ck.path}) {what} compared with {ref_name!r}{hint}; "
                f"{len(missing)} missing, {len(extra)} extra: models must share one architecture"
            )
        for t, e in ref.entries.items():
            if ck.entries[t].shape != e.shape:
                raise CheckpointError(
                    f"model {name!r} ({ck.path}): tensor {t!r} has shape {list(ck.entries[t].shape)}, "
                    f"{ref_name!r} has {list(e.shape)}"
                )
    return ckpts, base


def plan_shards(ref: Checkpoint, out_dtype: str | None, shard_bytes: int) -> list[ShardPlan]:
    """Group tensors, in checkpoint order, into output shards of about `shard_bytes`."""
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for name, e in ref.entries.items():
        code = dtype_code(out_dtype) if out_dtype and e.dtype in ("F32", "F16", "BF16", "F64") else e.dtype
        nbytes = e.numel * DTYPE_BYTES[code]
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, e.shape, code))
        size += nbytes
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardPlan(f, tuple(g)) for f, g in zip(names, groups)]


class ShardMerger:
    """Merges whole output shards; one instance lives in each Ray actor."""

    def __init__(self, spec: MergeSpec, cpus: float, stream_bytes: int, chunk_elems: int) -> None:
        torch.set_num_threads(max(1, int(cpus)))
        self.spec = spec
        self.stream_bytes = stream_bytes
        self.chunk_elems = chunk_elems
        self.ckpts, self.base = open_inputs(spec)
        self.num_layers = next(iter(self.ckpts.values())).num_layers
        self._units_done = 0

    def run(self, plan: ShardPlan, out_dir: str, allow_nonfinite: bool) -> dict:
        self._maybe_crash()
        from simmerge_ray.io.safetensors_format import StreamingWriter

        t0 = time.perf_counter()
        final = Path(out_dir) / plan.file
        partial = final.with_name(final.name + ".partial")
        writer = StreamingWriter(partial, list(plan.tensors), {"format": "pt"})
        read_bytes = 0
        names = [t[0] for t in plan.tensors]

        def fetch(i: int):
            # Streamed tensors are read chunk by chunk when merged, never prefetched whole.
            return None if i >= len(names) or self._streamed(names[i]) else pool.submit(self._read_inputs, names[i])

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = fetch(0)
            try:
                for i, (name, _, code) in enumerate(plan.tensors):
                    if pending is None:
                        read_bytes += self._merge_streamed(name, DTYPE_TO_TORCH[code], writer, allow_nonfinite)
                        pending = fetch(i + 1)
                        continue
                    inputs, base, nbytes = pending.result()
                    pending = fetch(i + 1)
                    merged = merge_tensor(self.spec, name, inputs.__getitem__, base, self.num_layers,
                                          allow_nonfinite=allow_nonfinite)
                    writer.write(name, merged.to(DTYPE_TO_TORCH[code]))
                    read_bytes += nbytes
                    del inputs, base, merged
                writer.close()
            except BaseException:
                writer.abort()
                raise
        os.replace(partial, final)
        self._units_done += 1
        return {"file": plan.file, "tensors": len(plan.tensors), "bytes_read": read_bytes,
                "bytes_written": final.stat().st_size, "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def _streamed(self, name: str) -> bool:
        """Merge chunk by chunk: the float32 working set of this tensor would exceed the budget
        and the method is a fixed linear combination (linear, SLERP, task arithmetic)."""
        if self.spec.method.combination is None:
            return False
        numel = next(iter(self.ckpts.values())).entries[name].numel
        return 4 * numel * (len(self.ckpts) + 2) > self.stream_bytes

    def _merge_streamed(self, name: str, dtype: torch.dtype, writer, allow_nonfinite: bool) -> int:
        """Two passes over chunks: the inputs' Gram matrix (SLERP only), then the combination."""
        spec = self.spec
        srcs = [self.ckpts[m.ref] for m in spec.inputs]
        base = self.base if (self.base is not None and not spec.method.base_in_inputs) else None
        options, per_model = spec.resolve(name, self.num_layers)
        numel = srcs[0].entries[name].numel
        chunk = max(1, self.chunk_elems)
        read = 0

        def chunks():
            nonlocal read
            for start in range(0, numel, chunk):
                k = min(chunk, numel - start)
                parts = [ck.read_range(name, start, k).to(torch.float32) for ck in srcs]
                b = base.read_range(name, start, k).to(torch.float32) if base is not None else None
                read += k * sum(DTYPE_BYTES[ck.entries[name].dtype] for ck in [*srcs, *([base] if base else [])])
                yield start, parts, b

        gram = None
        if spec.method.combination_needs_gram:
            gram = np.zeros((len(srcs), len(srcs)))
            for _, parts, _ in chunks():
                block = torch.stack(parts).double()
                gram += (block @ block.T).numpy()
        coeffs, base_coeff = spec.method.combination(gram, options, per_model)
        for _, parts, b in chunks():
            out = torch.zeros_like(parts[0])
            for c, x in zip(coeffs, parts):
                out.add_(x, alpha=c)
            if b is not None and base_coeff != 0:
                out.add_(b, alpha=base_coeff)
            if not allow_nonfinite and not torch.isfinite(out).all():
                raise MergeError(f"merged tensor {name!r} has {int((~torch.isfinite(out)).sum())} NaN/Inf values "
                                 f"({spec.method.name}); pass --allow-nonfinite to write it anyway")
            writer.write_part(name, out.to(dtype))
        return read

    def _read_inputs(self, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
        inputs = {ref: ck.read(name) for ref, ck in self.ckpts.items()}
        nbytes = sum(ck.entries[name].nbytes for ck in self.ckpts.values())
        base = None
        if self.base is not None:
            base = inputs.get(self.spec.base.ref) if self.spec.base.ref in inputs else self.base.read(name)
            if self.spec.base.ref not in self.ckpts:
                nbytes += self.base.entries[name].nbytes
        return inputs, base, nbytes

    def _maybe_crash(self) -> None:
        marker = os.environ.get(CRASH_ONCE_ENV)
        if marker and self._units_done >= 1 and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)


def run_merge(spec: MergeSpec, out: str | Path, opts: ExecOptions = ExecOptions()) -> MergeResult:
    """Merge `spec` into the folder `out` (written beside it, renamed when complete)."""
    t0 = time.perf_counter()
    ckpts, base = open_inputs(spec)
    ref = next(iter(ckpts.values()))
    spec.check_tensors(ref.tensor_names, ref.num_layers)
    plans = plan_shards(ref, spec.out_dtype or spec.dtype, opts.shard_bytes)
    out = Path(out)
    with atomic_output_dir(out, overwrite=opts.overwrite) as tmp:
        worker_cls = ray.remote(ShardMerger).options(
            num_cpus=opts.cpus_per_worker,
            memory=opts.memory_per_worker,
            max_restarts=opts.max_retries,
            max_task_retries=opts.max_retries,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k == CRASH_ONCE_ENV}} or None,
        )
        n_workers = max(1, min(opts.workers, len(plans)))
        workers = [worker_cls.remote(spec, opts.cpus_per_worker, opts.stream_bytes, opts.chunk_elems)
                   for _ in range(n_workers)]
        try:
            # Largest shards first, round robin: the pool finishes close together.
            order = sorted(range(len(plans)), key=lambda i: -sum(
                ref.entries[n].numel for n, _, _ in plans[i].tensors))
            futures = [workers[k % n_workers].run.remote(plans[i], str(tmp), opts.allow_nonfinite)
                       for k, i in enumerate(order)]
            stats = ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
            if isinstance(cause, (MergeError, CheckpointError)):
                raise cause from None
            raise
        finally:
            for w in workers:
                ray.kill(w)
        _write_side_files(spec, ckpts, base, plans, tmp)
    stats.sort(key=lambda s: s["file"])
    return MergeResult(
        out=out,
        tensors=sum(len(p.tensors) for p in plans),
        shards=len(plans),
        bytes_read=sum(s["bytes_read"] for s in stats),
        bytes_written=sum(s["bytes_written"] for s in stats),
        seconds=time.perf_counter() - t0,
        per_shard=stats,
    )


def _write_side_files(spec: MergeSpec, ckpts: dict[str, Checkpoint], base: Checkpoint | None,
                      plans: list[ShardPlan], out: Path) -> None:
    """Index, config, generation config and tokenizer (from the base model, else the first)."""
    if len(plans) > 1:
        weight_map = {name: p.file for p in plans for name, _, _ in p.tensors}
        total = sum((out / p.file).stat().st_size for p in plans)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    source = base if base is not None else next(iter(ckpts.values()))
    tok_source = source
    if spec.tokenizer_source not in (None, "base"):
        tok_source = ckpts.get(spec.tokenizer_source) or source
    if source.path.is_dir():
        config = dict(source.config)
        out_dtype = spec.out_dtype or spec.dtype
        if out_dtype:
            key = "dtype" if "dtype" in config else "torch_dtype"
            config[key] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype_code(out_dtype)]
        if config:
            (out / "config.json").write_text(json.dumps(config, indent=2))
        if (source.path / "generation_config.json").exists():
            shutil.copy2(source.path / "generation_config.json", out / "generation_config.json")
    if tok_source.path.is_dir():
        copy_tokenizer(tok_source.path, out)
    (out / "simmerge_merge.json").write_text(json.dumps({
        "merge_method": spec.method.name,
        "models": [m.ref for m in spec.inputs],
        "base_model": spec.base.ref if spec.base else None,
        "seed": spec.seed,
    }, indent=2))
