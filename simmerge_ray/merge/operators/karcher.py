"""Karcher mean: the equal-weight Riemannian mean of the models' directions on the unit sphere
(fixed-point iterations), scaled by their mean norm.

Norms are taken in float32 (float64 for float64 inputs) and every direction is kept in the
inputs' dtype, rounded after each step, as mergekit computes it: in bf16/fp16 the bytes follow.
"""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def _norm(x: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(wide))


def karcher(inp: MergeInputs) -> torch.Tensor:
    tensors = inp.tensors
    if len(tensors) == 1:
        return tensors[0]
    tol, max_iter = float(inp.options["tol"]), int(inp.options["max_iter"])
    dtype = tensors[0].dtype
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [_norm(t, wide) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    mean_norm = _norm(mean, wide)
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = _norm(tangent, wide)
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(dtype)
        length = _norm(mean, wide)
        if length.item() > tol:
            mean = (mean / length).to(dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


register(MergeMethod(
    name="karcher",
    fn=karcher,
    params=(Param("max_iter", 10, low=1, integer=True), Param("tol", 1e-5, low=0.0)),
    min_models=1,
    native_dtype=True,
    doc="Riemannian (Karcher) mean of the directions, times the mean norm",
))
