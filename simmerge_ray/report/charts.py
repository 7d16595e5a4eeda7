"""Charts of the demo report (matplotlib, PNG). Each takes plain numbers, so it is testable alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def legend_beside(ax) -> None:
    """The legend to the right of the axes, outside them, where it covers no bar."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def bars_under_legend(fig) -> list[str]:
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


def grouped_bars_figure(values: dict[str, dict[str, float]], ylabel: str, title: str, scale: float = 100.0):
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
    plt = _plt()
    fig = grouped_bars_figure(values, ylabel, title, scale)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
