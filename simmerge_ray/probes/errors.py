"""Errors raised by the probe and functional-feature stages."""

from simmerge_ray.errors import ConfigError


class ProbeError(ConfigError):
    """A probe file is missing, empty, undecodable or holds a probe that tokenises to nothing."""


class VocabularyError(ConfigError):
    """Two models cannot be compared position by position: their vocabularies or tokenisation differ."""
