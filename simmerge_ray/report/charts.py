"""Charts of the demo report (matplotlib, PNG). Each takes plain numbers, so it is testable alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simmerge_ray.io.atomic import atomic_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def feature_utility_heatmap(x: np.ndarray, y: np.ndarray, features: list[str], operators: list[str],
                            path: Path, top: int = 24) -> Path:
    """Pearson correlation of each feature with each operator's utility (the `top` features
    with the largest absolute correlation), as in the paper's correlation analysis."""
    plt = _plt()
    corr = np.zeros((x.shape[1], y.shape[1]))
    for i in range(x.shape[1]):
        for j in range(y.shape[1]):
            xi, yj = x[:, i], y[:, j]
            ok = np.isfinite(xi) & np.isfinite(yj)
            if ok.sum() > 2 and xi[ok].std() > 0 and yj[ok].std() > 0:
                corr[i, j] = np.corrcoef(xi[ok], yj[ok])[0, 1]
    order = np.argsort(-np.abs(corr).max(axis=1))[:top]
    fig, ax = plt.subplots(figsize=(1.2 * len(operators) + 3.5, 0.28 * len(order) + 1.2))
    im = ax.imshow(corr[order], cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(operators)), operators)
    ax.set_yticks(range(len(order)), [features[i] for i in order], fontsize=7)
    fig.colorbar(im, ax=ax, label="Pearson r with GapClosed")
    ax.set_title("feature-utility correlation per operator", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def legend_beside(ax: Axes) -> None:
    """The legend to the right of the axes, outside them, where it covers no bar."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def bars_under_legend(fig: Figure) -> list[str]:
    """The labels of the bars whose drawn box meets the legend's (none in a readable chart)."""
    fig.canvas.draw()
    covered = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        for container in ax.containers:
            covered += [container.get_label() for bar in container if bar.get_window_extent().overlaps(box)]
    return covered


def grouped_bars_figure(values: dict[str, dict[str, float]], ylabel: str, title: str, scale: float = 100.0) -> Figure:
    """values[group][method] -> a bar per method within each group; the legend beside the axes."""
    plt = _plt()
    groups = list(values)
    methods = list(dict.fromkeys(m for g in groups for m in values[g]))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)) + 1.6, 3.6))
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(groups)) + i * width, [scale * values[g].get(m, np.nan) for g in groups], width, label=m)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    legend_beside(ax)
    fig.tight_layout()
    return fig


def grouped_bars(values: dict[str, dict[str, float]], path: Path, ylabel: str, title: str,
                 scale: float = 100.0) -> Path:
    """`grouped_bars_figure`, saved as a PNG at `path`."""
    return save_figure(grouped_bars_figure(values, ylabel, title, scale), path)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (its folder created; the file complete or absent) and close it."""
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def regret_chart(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Cumulative regret per policy over rounds (mean, one standard deviation shaded), one panel
    per bandit replay; a dashed line where a new arm was added."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (run, res) in zip(axes[0], results.items()):
        t = np.arange(1, res["rounds"] + 1)
        for name, entry in res["policies"].items():
            mean, std = np.array(entry["cum_regret_mean"]), np.array(entry["cum_regret_std"])
            ax.plot(t, mean, label=name)
            ax.fill_between(t, mean - std, mean + std, alpha=0.15)
        if res["new_operator"] is not None:
            ax.axvline(res["add_at"], color="grey", ls="--", lw=1)
            ax.set_title(f"{run}: '{res['new_operator']}' added after round {res['add_at']}")
        else:
            ax.set_title(run)
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative regret (utility, vs the oracle's pick)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
