"""Merge operators: each a pure function of float32 tensors, registered by name."""

from simmerge_ray.merge.operators import linear, slerp, task_arithmetic  # noqa: F401  (register)
from simmerge_ray.merge.operators.registry import METHODS, MergeInputs, MergeMethod, Param, get_method

__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Param", "get_method"]
