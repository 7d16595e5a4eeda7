"""Out-of-fold predictions: every row predicted by a selector fitted without its model pair.

Shared by the held-out evaluation (evaluate.py) and the interval calibration (uncertainty.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.folds import Split
from simmerge_ray.selector.model import Selector

FitFn = Callable[[PairData], Selector]


def out_of_fold(data: PairData, splits: list[Split], fit: FitFn) -> tuple[np.ndarray, list[str]]:
    """Predicted utilities for every test row, and the majority-class operator of its training part."""
    pred = np.full(data.y.shape, np.nan)
    majority = [""] * len(data)
    for tr, te in splits:
        train = data.subset(tr)
        sel = fit(train)
        test = data.subset(te)
        pred[te] = sel.predict(test.x, test.tasks)
        best_in_train = Counter(train.operators[i] for i in train.y.argmax(axis=1)).most_common(1)[0][0]
        for i in te:
            majority[i] = best_in_train
    return pred, majority
