"""Context encoders z = g(x): the frozen map from raw pair features to the bandit's features.

METHOD.md uses the offline selector's last hidden layer. The selector plugs in by implementing
`Encoder` and registering a loader in `ENCODER_LOADERS`; `IdentityEncoder` (standardised raw
features) lets the bandit run without one. Encoders are rebuilt from a JSON spec so that a
restarted actor gets exactly the same map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from simmerge_ray.errors import ConfigError
from simmerge_ray.bandit.limits import check_features
from simmerge_ray.features.schema import B_TASK_SUFFIX
from simmerge_ray.selector.domain import TrainingDomain, spread, training_domain


@runtime_checkable
class Encoder(Protocol):
    """A frozen feature map. `feature_names` fixes the order of the raw input columns."""

    @property
    def feature_names(self) -> tuple[str, ...]: ...

    @property
    def width(self) -> int:
        """Width h of the encoded features."""
        ...

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Map raw features [n, d] (d = len(feature_names)) to encoded features [n, h]."""
        ...

    @property
    def nullable(self) -> frozenset[str] | None:
        """The raw columns a context may leave undefined (null), imputed by `encode`; None: any."""
        ...

    def outlier(self, x: np.ndarray) -> dict[str, Any] | None:
        """For one raw context [1, d]: its most extreme feature when the context lies outside
        what the offline rows covered (selector/domain.py's rule), else None (also when the
        offline rows were not recorded)."""
        ...

    def spec(self) -> dict[str, Any]:
        """JSON-able description that `load_encoder` turns back into an equal encoder."""
        ...


class IdentityEncoder:
    """Standardise each raw feature with a mean and scale fitted once, then frozen; an undefined
    (NaN) feature is imputed with that mean, as the selector's design does."""

    kind = "identity"

    def __init__(self, feature_names: Sequence[str], mean: np.ndarray, scale: np.ndarray,
                 nullable: Sequence[str] | None = None, domain: TrainingDomain | None = None):
        self._names = tuple(feature_names)
        self._nullable = None if nullable is None else frozenset(nullable)
        self.domain = domain  # None for a state written before it was recorded: no flag
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        d = len(self._names)
        if self.mean.shape != (d,) or self.scale.shape != (d,):
            raise ConfigError(
                f"identity encoder: mean/scale shapes {self.mean.shape}/{self.scale.shape} "
                f"do not match {d} feature names"
            )
        if not (np.all(np.isfinite(self.mean)) and np.all(self.scale > 0)):
            raise ConfigError("identity encoder: mean must be finite and scale positive")

    @classmethod
    def fit(cls, feature_names: Sequence[str], x: np.ndarray) -> IdentityEncoder:
        """Fit on the offline features, NaN (undefined for a row) left out of the statistics;
        constant columns keep scale 1 (they become 0)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(feature_names) or x.shape[0] == 0:
            raise ConfigError(
                f"identity encoder: need a non-empty [n, {len(feature_names)}] matrix, got {x.shape}"
            )
        undefined = [n for n, none in zip(feature_names, np.isnan(x).all(axis=0)) if none]
        if undefined:
            raise ConfigError(f"identity encoder: feature columns defined in no row: {undefined}")
        if np.isinf(x).any():
            raise ConfigError("identity encoder: fitting features contain Inf")
        std = np.nanstd(x, axis=0)
        # Undefined for some pair: a column null in some offline row, and the columns measured on
        # the joining model's own task, which a new task-less model leaves null; any other null is
        # a client's mistake, not a missing measurement.
        nullable = [n for n, some in zip(feature_names, np.isnan(x).any(axis=0)) if some or n.endswith(B_TASK_SUFFIX)]
        mean, scale = np.nanmean(x, axis=0), np.where(std > 1e-12, std, 1.0)
        domain = training_domain((x - mean) / scale, list(feature_names), same_task_pairs=None)
        return cls(feature_names, mean, scale, nullable, domain)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def width(self) -> int:
        return len(self._names)

    @property
    def nullable(self) -> frozenset[str] | None:
        return self._nullable  # None for a state written before it was recorded: any column

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = check_features(x, len(self._names))
        return np.nan_to_num((x - self.mean) / self.scale, nan=0.0)  # undefined: the offline mean

    def outlier(self, x: np.ndarray) -> dict[str, Any] | None:
        if self.domain is None:
            return None
        return self.domain.outlier(((check_features(x, len(self._names)) - self.mean) / self.scale)[0])

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "feature_names": list(self._names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            **({} if self._nullable is None else {"nullable": sorted(self._nullable)}),
            **({} if self.domain is None else {"domain": self.domain.to_dict()}),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> IdentityEncoder:
        domain = (TrainingDomain.from_dict(spec["domain"], list(spec["feature_names"]), "identity encoder")
                  if "domain" in spec else None)
        return cls(spec["feature_names"], np.array(spec["mean"]), np.array(spec["scale"]), spec.get("nullable"),
                   domain)


def out_of_range(encoder: Encoder, x: np.ndarray) -> dict[str, Any] | None:
    """The encoder's outlier for context `x`, with the sentence a client can show (None inside
    the offline rows)."""
    out = encoder.outlier(x)
    if out is None:
        return None
    return {**out, "message": f"{out['feature']} at z = {out['z']:+.1f} is outside the offline rows "
                              f"({spread(out, 'them')}): the scores extrapolate"}


def _selector_encoder(spec: dict[str, Any]) -> Encoder:
    from simmerge_ray.selector.encoder import SelectorEncoder

    return SelectorEncoder.from_spec(spec)


ENCODER_LOADERS: dict[str, Callable[[dict[str, Any]], Encoder]] = {
    IdentityEncoder.kind: IdentityEncoder.from_spec,
    "selector": _selector_encoder,  # the offline selector's last hidden layer (METHOD.md)
}


def load_encoder(spec: dict[str, Any]) -> Encoder:
    """Rebuild an encoder from its `spec()`."""
    kind = spec.get("kind")
    if kind not in ENCODER_LOADERS:
        raise ConfigError(f"encoder spec: unknown kind {kind!r} (known: {sorted(ENCODER_LOADERS)})")
    return ENCODER_LOADERS[kind](spec)
