"""Merge operators: each a pure function of tensors (in the compute dtype), registered by name."""

from simmerge_ray.merge.operators import (  # noqa: F401  (register)
    arcee_fusion, karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, ram, sce, slerp,
    task_arithmetic,
)
from simmerge_ray.merge.operators.registry import METHODS, MergeInputs, MergeMethod, Param, get_method

__all__ = ["METHODS", "MergeInputs", "MergeMethod", "Param", "get_method"]
