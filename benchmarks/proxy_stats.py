"""How close the planner's propagated features are to the features of merges actually built.

Pure comparison code: given the features the planner derives for (M = op(A, B), C) pairs and
the features measured on the built M, per operator and feature family, the rank correlation
(the selector ranks operators, so order is what matters) and the absolute error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Feature families, by column prefix, in the order a report lists them; the first match wins.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("s_sign_agree", "sign agreement (mixture)"),
    ("s_", "weight-space (Gram)"),
    ("f_kl_", "KL (convexity bound)"),
    ("f_act_cos", "activation cosine (mixture)"),
    ("f_attn_cos", "attention cosine (mixture)"),
)


def family(column: str) -> str | None:
    return next((name for prefix, name in FAMILIES if column.startswith(prefix)), None)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            r[order[start:end]] = (start + end - 1) / 2
            start = end
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation over the rows where both are finite (NaN when undefined)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = ranks(x[ok]), ranks(y[ok])
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def compare_columns(predicted: np.ndarray, actual: np.ndarray, columns: Sequence[str]) -> dict[str, dict]:
    """Per column: Spearman, mean and max absolute error, relative error of the mean."""
    out = {}
    for j, c in enumerate(columns):
        p, a = predicted[:, j], actual[:, j]
        ok = np.isfinite(p) & np.isfinite(a)
        err = np.abs(p[ok] - a[ok])
        out[c] = {
            "spearman": spearman(p, a),
            "mae": float(err.mean()) if ok.any() else float("nan"),
            "max_abs": float(err.max()) if ok.any() else float("nan"),
            "rel_mae": float(err.mean() / max(np.abs(a[ok]).mean(), 1e-12)) if ok.any() else float("nan"),
            "n": int(ok.sum()),
        }
    return out


def summarize_families(per_column: dict[str, dict]) -> dict[str, dict]:
    """Median over a family's columns of the Spearman and relative error, and the worst max error."""
    fams: dict[str, list[dict]] = {}
    for c, v in per_column.items():
        f = family(c)
        if f is not None:
            fams.setdefault(f, []).append(v)
    out = {}
    for _, name in FAMILIES:
        vals = fams.get(name)
        if not vals:
            continue
        rho = [v["spearman"] for v in vals if v["spearman"] == v["spearman"]]
        out[name] = {
            "columns": len(vals),
            "spearman_median": float(np.median(rho)) if rho else float("nan"),
            "spearman_min": float(np.min(rho)) if rho else float("nan"),
            "rel_mae_median": float(np.median([v["rel_mae"] for v in vals])),
            "max_abs": float(np.nanmax([v["max_abs"] for v in vals])),
        }
    return out
