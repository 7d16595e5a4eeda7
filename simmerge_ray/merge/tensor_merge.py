"""Merging one tensor: read inputs, resolve parameters, call the method, check the result.

Shared by the streaming Ray executor and the in-memory merges of the testbed, so both produce
the same values for the same config and seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

from simmerge_ray.errors import MergeError
from simmerge_ray.merge.config import MergeSpec
from simmerge_ray.merge.operators import MergeInputs


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): stochastic methods give the same bytes
    whichever worker runs the tensor and however often it is retried."""
    digest = hashlib.blake2b(f"{seed}|{tensor_name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def merge_tensor(spec: MergeSpec, name: str, read: Callable[[str], torch.Tensor],
                 base: torch.Tensor | None, num_layers: int, *,
                 allow_nonfinite: bool = False) -> torch.Tensor:
    """The merged float32 value of tensor `name`.

    `read(ref)` returns an input model's tensor (any dtype); inputs are read in config order.
    """
    options, per_model = spec.resolve(name, num_layers)
    tensors = [read(m.ref).to(torch.float32) for m in spec.inputs]
    base_f32 = base.to(torch.float32) if base is not None else None
    gen = tensor_generator(spec.seed, name) if spec.method.stochastic else None
    out = spec.method.fn(MergeInputs(tensors, base_f32, per_model, options, gen))
    if not allow_nonfinite and not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise MergeError(
            f"merged tensor {name!r} has {bad} NaN/Inf values ({spec.method.name}); "
            f"pass --allow-nonfinite to write it anyway"
        )
    return out


def merge_state_dicts(spec: MergeSpec, states: Mapping[str, Mapping[str, torch.Tensor]],
                      num_layers: int, *, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts keyed by the config's model refs (small models only).

    The output keeps each tensor in the dtype of the first input (float32 math in between).
    """
    first = states[spec.inputs[0].ref]
    base_state = states[spec.base.ref] if spec.base is not None else None
    out: dict[str, torch.Tensor] = {}
    for name, ref_t in first.items():
        base_t = base_state[name] if base_state is not None else None
        merged = merge_tensor(spec, name, lambda r: states[r][name], base_t, num_layers,
                              allow_nonfinite=allow_nonfinite)
        out[name] = merged.to(ref_t.dtype)
    return out
