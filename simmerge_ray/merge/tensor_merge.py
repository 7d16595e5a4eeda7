"""Merging one tensor: read inputs, resolve parameters, call the method, check the result.

The streaming executor's per-tensor step (the testbed's in-memory merges call the same
registered operator functions, so both produce the same values).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError, MergeError
from simmerge_ray.io.safetensors_format import DTYPE_TO_TORCH, FLOAT_DTYPES, dtype_code
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import MergeInputs
from simmerge_ray.merge.tensor_plan import TensorTask


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): stochastic methods give the same bytes
    whichever worker runs the tensor and however often it is retried."""
    digest = hashlib.blake2b(f"{seed}|{tensor_name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def compute_code(spec: MergeSpec, override: str | None = None) -> str:
    """The dtype code a merge computes in: `override` (--compute-dtype), else the config's
    `dtype` (mergekit's meaning), else float32."""
    name = override or spec.dtype or "float32"
    code = dtype_code(name)
    if code not in FLOAT_DTYPES:
        raise ConfigError(f"{spec.source}: compute dtype {name!r} is not a float dtype")
    return code



def working_dtype(spec: MergeSpec, compute: torch.dtype) -> torch.dtype:
    """The dtype the method's function receives: the compute dtype for methods that compute in
    it (mergekit's task-arithmetic family), float32 for the others (inputs rounded first)."""
    return compute if spec.method.native_dtype else torch.float32


def merge_tensor(spec: MergeSpec, task: TensorTask, read: Callable[[tuple[str, str]], torch.Tensor], *,
                 compute: torch.dtype | None = None, allow_nonfinite: bool = False) -> torch.Tensor:
    """The merged value of one output tensor, rounded to `compute` as mergekit rounds it.

    `read((model ref, tensor name))` returns an input tensor (any dtype), as `task` names them.
    Inputs are rounded to `compute` first; vocabulary tensors are then remapped to the output
    tokenizer's rows (in `compute`, as mergekit does).
    """
    compute = torch.float32 if compute is None else compute
    work = working_dtype(spec, compute)
    loaded = {r: read(r).to(compute) for r in task.all_reads}
    if task.vocab is not None:
        loaded = task.vocab.remap(loaded)
    tensors = [loaded[r].to(work) for r in task.reads]
    base = loaded[task.base].to(work) if task.base is not None else None
    gen = tensor_generator(spec.seed, task.name) if spec.method.stochastic else None
    out = spec.method.fn(MergeInputs(tensors, base, task.per_model, task.options, gen)).to(compute)
    if not allow_nonfinite:
        check_finite(out, task.name, spec.method.name)
    return out


def check_finite(values: torch.Tensor, name: str, method: str, *, offset: int = 0) -> None:
    """Refuse NaN/Inf in a merged tensor (or in its chunk starting at element `offset`).

    A finite sum proves every value finite (NaN and Inf propagate through it) in one reduction;
    only a non-finite sum, which overflow can also produce, pays for the element-wise check.
    """
    if torch.isfinite(values.sum()):
        return
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if count:
        raise nonfinite_error(name, method, count, offset + int(bad.reshape(-1).nonzero()[0]), offset,
                              values.numel())


def nonfinite_error(name: str, method: str, count: int, first: int, offset: int, numel: int) -> MergeError:
    """The one-line error for `count` NaN/Inf values (the first at flat index `first`) in a merged
    tensor, or in its chunk of `numel` elements from `offset`."""
    where = f" among elements {offset}..{offset + numel - 1}" if offset else ""
    return MergeError(f"merged tensor {name!r} has {count} NaN/Inf values{where} (first at flat index {first}; "
                      f"{method}); pass --allow-nonfinite to write it anyway")
