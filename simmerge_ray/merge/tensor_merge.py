"""Merging one tensor: read inputs, resolve parameters, call the method, check the result.

The streaming executor's per-tensor step (the testbed's in-memory merges call the same
registered operator functions, so both produce the same values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from simmerge_ray.io.digest_cache import name_seed
from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError, MergeError
from simmerge_ray.io.safetensors_format import DTYPE_TO_TORCH, FLOAT_DTYPES, dtype_code, promoted
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import MergeInputs
from simmerge_ray.merge.tensor_plan import TensorTask


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): stochastic methods give the same bytes
    whichever worker runs the tensor and however often it is retried."""
    return torch.Generator().manual_seed(name_seed(seed, tensor_name))


def compute_code(spec: MergeSpec, override: str | None = None) -> str | None:
    """The dtype code every tensor of a merge computes in: `override` (--compute-dtype), else the
    config's `dtype` (mergekit's meaning); None without either: each tensor then computes in its
    inputs' dtype (see tensor_compute)."""
    name = override or spec.dtype
    if name is None:
        return None
    code = dtype_code(name)
    if code not in FLOAT_DTYPES:
        raise ConfigError(f"{spec.source}: compute dtype {name!r} is not a float dtype")
    return code


def tensor_compute(merge_compute: str | None, stored: Iterable[str]) -> str:
    """The dtype code one output tensor computes in: the merge's (--compute-dtype or the
    config's `dtype`), else its inputs' promoted dtype, as mergekit computes without `dtype`
    (float32 for a tensor that is not all floats)."""
    return merge_compute or promoted(stored) or "F32"


def working_dtype(spec: MergeSpec, compute: torch.dtype) -> torch.dtype:
    """The dtype the method's function receives: the compute dtype for methods that compute in
    it as mergekit's do (all but linear and SLERP), float32 for those two (inputs rounded first)."""
    return compute if spec.method.native_dtype else torch.float32


def merge_tensor(spec: MergeSpec, task: TensorTask, read: Callable[[tuple[str, str]], torch.Tensor], *,
                 allow_nonfinite: bool = False) -> torch.Tensor:
    """The merged value of one output tensor, rounded to its compute dtype (`task.compute`) as
    mergekit rounds it.

    `read((model ref, tensor name))` returns an input tensor (any dtype), as `task` names them.
    Inputs are rounded to the compute dtype first; vocabulary tensors are then remapped to the
    output tokenizer's rows (in that dtype, as mergekit does).
    """
    compute = DTYPE_TO_TORCH[task.compute]
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


class NonFiniteError(MergeError):
    """NaN/Inf in a merged tensor; `tensor` and `first` (flat index) let the caller say which
    input holds one there (UnitMerger, which knows the inputs)."""

    tensor: str = ""
    first: int = -1


def nonfinite_error(name: str, method: str, count: int, first: int, offset: int, numel: int) -> NonFiniteError:
    """The one-line error for `count` NaN/Inf values (the first at flat index `first`) in a merged
    tensor, or in its chunk of `numel` elements from `offset`."""
    where = f" among elements {offset}..{offset + numel - 1}" if offset else ""
    err = NonFiniteError(f"merged tensor {name!r} has {count} NaN/Inf values{where} (first at flat index {first}; "
                         f"{method}); pass --allow-nonfinite to write it anyway")
    err.tensor, err.first = name, first
    return err
