"""In-memory merges of small state dicts with the project's merge operators.

The testbed's models are tiny, so a merge is a loop over tensor names calling the registered
operator function directly; the same functions back the streaming executor, so a label measured
here is the merge the executor would write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from simmerge_ray.errors import ConfigError, MergeError
from simmerge_ray.merge.arms import Arm, get_arm
from simmerge_ray.merge.operators import MergeInputs, get_method
from simmerge_ray.merge.tensor_merge import tensor_generator

StateDict = Mapping[str, torch.Tensor]


def merge_arm(arm: Arm | str, first: StateDict, second: StateDict, base: StateDict | None, *,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge two state dicts with an arm (merge/arms.py; by name, or a weighted step's Arm)."""
    a = get_arm(arm) if isinstance(arm, str) else arm
    return merge_state_dicts(a.method, [first, second], base, a.params, seed=seed)


def merge_state_dicts(method: str, state_dicts: Sequence[StateDict], base_state_dict: StateDict | None,
                      params: Mapping[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge `state_dicts` tensor by tensor with operator `method`.

    `params` holds the method's parameters: per-model ones as lists (one value per state dict),
    global ones as scalars; missing ones take the method's defaults. Methods that take the base
    as an input (slerp) get `state_dicts[0]` there.
    """
    m = get_method(method)
    try:
        per_model, options = m.resolve(params, len(state_dicts))
    except ConfigError as e:
        raise MergeError(str(e)) from None
    if m.needs_base and not m.base_in_inputs and base_state_dict is None:
        raise MergeError(f"{method}: needs the base model's weights")
    out: dict[str, torch.Tensor] = {}
    for name, ref in state_dicts[0].items():
        try:
            tensors = [sd[name].to(torch.float32) for sd in state_dicts]
        except KeyError:
            raise MergeError(f"{method}: tensor {name!r} is missing from one of the inputs") from None
        base = base_state_dict[name].to(torch.float32) if (base_state_dict is not None and not m.base_in_inputs) else None
        gen = tensor_generator(seed, name) if m.stochastic else None
        merged = m.fn(MergeInputs(tensors, base, per_model, options, gen))
        if not torch.isfinite(merged).all():
            raise MergeError(f"{method}: merged tensor {name!r} has NaN/Inf values")
        out[name] = merged.to(ref.dtype)
    return out
