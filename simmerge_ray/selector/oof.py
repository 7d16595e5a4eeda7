"""Out-of-fold predictions: every row predicted by a selector fitted without its model pair.

Shared by the held-out evaluation (evaluate.py) and the interval calibration (uncertainty.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.folds import Split
from simmerge_ray.selector.model import Selector

FitFn = Callable[[PairData], Selector]


def per_split(fit: FitFn | Sequence[FitFn], splits: Sequence[Split]) -> list[FitFn]:
    """One fit per split: the same for all, or one each (hyperparameters searched per fold)."""
    if callable(fit):
        return [fit] * len(splits)
    if len(fit) != len(splits):
        raise ValueError(f"{len(fit)} fit functions for {len(splits)} folds")
    return list(fit)


def out_of_fold(data: PairData, splits: list[Split], fit: FitFn | Sequence[FitFn]) -> tuple[np.ndarray, list[str]]:
    """Predicted utilities for every test row, and the majority-class operator of its training part
    (`fit`: one for every split, or one per split)."""
    pred = np.full(data.y.shape, np.nan)
    majority = [""] * len(data)
    for (tr, te), fit_fold in zip(splits, per_split(fit, splits)):
        train = data.subset(tr)
        sel = fit_fold(train)
        test = data.subset(te)
        pred[te] = sel.predict(test.x, test.tasks)
        best_in_train = Counter(train.operators[i] for i in train.y.argmax(axis=1)).most_common(1)[0][0]
        for i in te:
            majority[i] = best_in_train
    return pred, majority
