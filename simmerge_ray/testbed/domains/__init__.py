"""The five domains of the testbed, by name."""

from __future__ import annotations

from simmerge_ray.errors import ConfigError
from simmerge_ray.testbed.domains import code, instruct, math, multilingual, rag
from simmerge_ray.testbed.domains.base import Domain, Example, Split

DOMAINS: dict[str, Domain] = {d.name: d for d in (code.DOMAIN, math.DOMAIN, multilingual.DOMAIN, rag.DOMAIN, instruct.DOMAIN)}


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise ConfigError(f"domains: unknown domain {name!r}; known: {', '.join(DOMAINS)}") from None


__all__ = ["DOMAINS", "Domain", "Example", "Split", "get_domain"]
