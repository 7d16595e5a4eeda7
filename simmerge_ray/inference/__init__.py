"""Probe inference: back-ends that run a model, the Ray Data pipeline and the output cache."""
