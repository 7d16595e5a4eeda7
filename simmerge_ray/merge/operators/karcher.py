"""Karcher mean: the equal-weight Riemannian mean of the models' directions on the unit sphere
(fixed-point iterations), scaled by their mean norm."""

from __future__ import annotations

from simmerge_ray.lazy_torch import torch

from simmerge_ray.merge.operators.registry import MergeInputs, MergeMethod, Param, register


def karcher(inp: MergeInputs) -> torch.Tensor:
    tensors = inp.tensors
    if len(tensors) == 1:
        return tensors[0]
    tol, max_iter = float(inp.options["tol"]), int(inp.options["max_iter"])
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    return sum(a * n for a, n in zip(alphas, norms)) * mean


register(MergeMethod(
    name="karcher",
    fn=karcher,
    params=(Param("max_iter", 10, low=1, integer=True), Param("tol", 1e-5, low=0.0)),
    min_models=1,
    doc="Riemannian (Karcher) mean of the directions, times the mean norm",
))
