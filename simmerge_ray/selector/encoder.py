"""The selector's last hidden layer as the online bandit's frozen context encoder (METHOD.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from simmerge_ray.errors import CheckpointError
from simmerge_ray.selector.model import SCHEMA, WEIGHTS, Selector


class SelectorEncoder:
    """z = g(x): standardise, then the selector's hidden layers. Task-agnostic (no task code),
    so a new task needs nothing new; saved selectors are rebuilt from their folder."""

    kind = "selector"

    def __init__(self, selector: Selector, path: str | Path | None = None) -> None:
        self.selector = selector
        self.path = str(path) if path is not None else None

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.selector.feature_names)

    @property
    def width(self) -> int:
        return self.selector.width

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.selector.encode(x, None)

    def outlier(self, x: np.ndarray) -> dict[str, Any] | None:
        domain = self.selector.domain
        return None if domain is None else domain.outlier(self.selector.standardise(x)[0])

    @property
    def nullable(self) -> None:
        """Any column: the selector imputes its training mean wherever a value is undefined, and
        does not record which of its training columns had undefined rows."""
        return None

    def head_prior(self, intercept: bool = True) -> dict[str, np.ndarray]:
        """Per operator, the selector's linear utility head on z ([W_o, b_o], the bias last as in
        the bandit's design): as a warm bandit's prior mean, each arm starts from the offline
        selector's own prediction instead of from zero."""
        head = self.selector.net.head
        w = head.weight.detach().double().numpy()
        b = head.bias.detach().double().numpy()
        return {op: np.append(w[i], b[i]) if intercept else w[i].copy()
                for i, op in enumerate(self.selector.operators)}

    @classmethod
    def load(cls, path: str | Path) -> "SelectorEncoder":
        """The encoder of a saved selector folder (`simmerge fit`'s output)."""
        path = Path(path).resolve()
        return cls(Selector.load(path), path)

    def spec(self) -> dict[str, Any]:
        """The folder and a digest of its files: a bandit's posterior lives in this encoder's
        space, so a selector refitted in place must not be picked up silently."""
        if self.path is None:
            raise ValueError("a selector encoder needs a saved selector folder to be rebuilt")
        return {"kind": self.kind, "path": self.path, "digest": selector_digest(Path(self.path))}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "SelectorEncoder":
        path = Path(spec["path"])
        enc = cls.load(path)
        if selector_digest(path) != spec["digest"]:
            raise CheckpointError(f"{path}: this selector changed since the bandit state was created over it "
                                  f"(its posterior lives in the old selector's space); restore it or run "
                                  f"`simmerge bandit-init` again")
        return enc


def selector_digest(path: str | Path) -> str:
    """A selector folder's identity: its schema and weights (what every prediction is made of)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    for name in (SCHEMA, WEIGHTS):
        h.update(name.encode() + b"\0" + (path / name).read_bytes())
    return h.hexdigest()

