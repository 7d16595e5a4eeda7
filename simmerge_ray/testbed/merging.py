"""In-memory merges of small state dicts with the project's merge operators, and the label defaults.

The testbed's models are tiny, so a merge is a loop over tensor names calling the registered
operator function directly; the same functions back the streaming executor, so a label measured
here is the merge the executor would write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from simmerge_ray.errors import MergeError
from simmerge_ray.merge.operators import MergeInputs, get_method
from simmerge_ray.merge.tensor_merge import tensor_generator

StateDict = Mapping[str, torch.Tensor]

# The fixed operators of the labels and their default parameters (recorded in every label row).
# slerp's t=0 end ("base_model") is the first input: the expert, or the merge so far in a fold.
# ties works on task vectors against the zoo's base.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {"weight": [0.5, 0.5], "normalize": True},
    "slerp": {"t": 0.5, "base_model": "first"},
    "ties": {"weight": [1.0, 1.0], "density": [0.5, 0.5], "normalize": True, "base_model": "base"},
}
OPERATORS: tuple[str, ...] = tuple(DEFAULT_PARAMS)


def merge_state_dicts(method: str, state_dicts: Sequence[StateDict], base_state_dict: StateDict | None,
                      params: Mapping[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge `state_dicts` tensor by tensor with operator `method`.

    `params` holds the method's parameters: per-model ones as lists (one value per state dict),
    global ones as scalars; missing ones take the method's defaults. `base_model` in params is
    descriptive only. Methods that take the base as an input (slerp) get `state_dicts[0]` there.
    """
    m = get_method(method)
    per_model: dict[str, list] = {}
    options: dict[str, Any] = {}
    for p in m.params:
        value = params.get(p.name, p.default)
        if value is None:
            raise MergeError(f"{method}: missing parameter {p.name!r}")
        if p.per_model:
            values = list(value) if isinstance(value, (list, tuple)) else [value] * len(state_dicts)
            if len(values) != len(state_dicts):
                raise MergeError(f"{method}: parameter {p.name!r} has {len(values)} values for {len(state_dicts)} models")
            per_model[p.name] = values
        else:
            options[p.name] = value
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
