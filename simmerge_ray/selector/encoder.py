"""The selector's last hidden layer as the online bandit's frozen context encoder (METHOD.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simmerge_ray.selector.model import Selector


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

    def spec(self) -> dict[str, Any]:
        if self.path is None:
            raise ValueError("a selector encoder needs a saved selector folder to be rebuilt")
        return {"kind": self.kind, "path": self.path}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "SelectorEncoder":
        return cls(Selector.load(spec["path"]), spec["path"])

