"""Errors raised by the probe and functional-feature stages."""

from simmerge_ray.errors import ConfigError


class ProbeError(ConfigError):
    """A probe file is missing, empty, undecodable or holds a probe that tokenises to nothing."""


class VocabularyError(ConfigError):
    """Two models cannot be compared position by position: their vocabularies or tokenisation differ."""


class DistributionError(ConfigError):
    """A model's probe outputs make a functional feature undefined: a token it gives zero
    probability (logit -inf) where the other model does not (KL is infinite), or NaN outputs."""
