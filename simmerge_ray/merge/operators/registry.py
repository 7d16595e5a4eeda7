"""The merge-method registry: each method is a pure tensor function plus its parameters as data.

A method's function receives the inputs of one tensor in its working dtype (the compute dtype,
or float32 for linear and SLERP: see `native_dtype`) and resolved parameter values, and returns
the merged tensor. It does no I/O and knows nothing of Ray, so it is tested
directly against mergekit on small tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from typing import Any

import numpy as np  # noqa: F401  (named in the CombinationFn annotation)
from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import ConfigError

Value = float | int | bool


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max


@dataclass(frozen=True)
class Param:
    """One parameter of a method. `per_model` ones are set per input model (e.g. weight).

    A flag (bool default) takes true/false; any other parameter a finite number, an integer
    with `integer`, within [low, high] where given: checked on every value a config writes.
    """

    name: str
    default: Value | None = None  # None: required
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    integer: bool = False

    def problem(self, value: Any) -> str | None:
        """Why `value` is not valid for this parameter, or None when it is."""
        if isinstance(self.default, bool):
            return None if isinstance(value, bool) else "expected true or false"
        if isinstance(value, str) and _is_number(value):
            return "expected a finite number (this one is quoted: write it without quotes)"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "expected a finite number"
        if abs(value) > FLOAT32_MAX:  # parameters are applied in float32, as mergekit applies them
            return f"expected a number within float32's range (|x| <= {FLOAT32_MAX:.3g})"
        if self.integer and value != int(value):
            return "expected an integer"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"expected a number in [{'-inf' if self.low is None else self.low}, " \
                   f"{'inf' if self.high is None else self.high}]"
        return None


@dataclass(frozen=True)
class MergeInputs:
    """What a method sees for one tensor: the models' values, the base, and parameter values."""

    tensors: list[torch.Tensor]  # in the compute dtype (float32 unless native_dtype), in config order
    base: torch.Tensor | None  # as `tensors`, or None
    per_model: dict[str, list[Value]]  # param name -> one value per tensor above
    options: dict[str, Value]  # global parameters
    generator: torch.Generator | None = None  # for stochastic methods, seeded per tensor


MethodFn = Callable[[MergeInputs], "torch.Tensor"]
# Checks resolved parameters before any tensor is read; raises ConfigError naming the problem.
CheckFn = Callable[[str, dict[str, Value], dict[str, list[Value]]], None]
# For methods whose result is a fixed linear combination of the inputs (and the base):
# (Gram matrix of the input tensors or None, options, per-model values) -> (coefficient per
# input, coefficient of the base). Lets the executor stream a tensor larger than memory in
# chunks: one pass for the Gram matrix when `needs_gram`, one to combine.
CombinationFn = Callable[["np.ndarray | None", dict[str, Value], dict[str, list[Value]]], tuple[list[float], float]]
# How the executor evaluates a fixed combination when mergekit's order of operations differs
# from `combination`'s coefficients (linear: weights, then a division by their sum):
# (options, per-model values) -> (a weight per input, a divisor); the executor computes
# sum_i w_i x_i in float32 (one fused multiply-add per term) and divides by the divisor.
TermsFn = Callable[[dict[str, Value], dict[str, list[Value]]], tuple[list[float], float]]
# For methods that are elementwise once each model's magnitude mask over the whole tensor is
# known (TIES, task arithmetic with consensus): (chunk inputs, one MagnitudeMask or None per
# model) -> merged chunk. Lets the executor stream a tensor larger than memory: two passes of
# magnitude_select find the masks (for models with density < 1), a third merges.
ChunkedFn = Callable[["MergeInputs", list], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, parameters and input constraints."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    stochastic: bool = False
    # With `base_in_inputs`, the base model's tensor is passed as one of `tensors` (slerp, linear);
    # otherwise it is only `base` and its own entry in `models` (if any) is dropped (TIES & co).
    base_in_inputs: bool = True
    # With `base_first`, a listed base is the first input (SLERP's t=0 end).
    base_first: bool = False
    check: CheckFn | None = None
    combination: CombinationFn | None = None
    combination_needs_gram: bool = False
    combination_terms: TermsFn | None = None
    chunked: ChunkedFn | None = None
    # `chunked` sparsifies each model by magnitude masks (TIES): the executor finds them first.
    chunked_masks: bool = False
    # Computes in the dtype of its inputs (the compute dtype), every intermediate rounded to it,
    # as mergekit's version does (all but linear and SLERP); the others receive float32 inputs
    # rounded to the compute dtype and their result is rounded, as mergekit's linear/SLERP.
    native_dtype: bool = False
    doc: str = ""  # one line: what it computes (`merge --help` lists it)

    @property
    def elementwise(self) -> bool:
        """Every element merges on its own with coefficients known before any read (linear, task
        arithmetic): a tensor can be merged, and split between workers, by element range."""
        return self.combination is not None and not self.combination_needs_gram

    def resolve(self, params: Mapping[str, Any], n_models: int) -> tuple[dict[str, list[Value]], dict[str, Value]]:
        """Split flat parameter values into (per-model lists, global options), defaults filled in.

        Per-model values may be one scalar for every model or a list of `n_models` values.
        """
        per_model: dict[str, list[Value]] = {}
        options: dict[str, Value] = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is None:
                raise ConfigError(f"{self.name}: missing parameter {p.name!r}")
            if p.per_model:
                values = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(values) != n_models:
                    raise ConfigError(f"{self.name}: parameter {p.name!r} has {len(values)} values for {n_models} models")
                per_model[p.name] = values
            else:
                options[p.name] = value
        return per_model, options

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; the error lists what exists."""
    import simmerge_ray.merge.operators  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"merge_method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None
