"""The report's bar charts keep their legend off the bars (it once covered the math bars of the
utility chart, then gap_closed.png, and the negative bars of multiway_retention.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simmerge_ray.merge.arms import PAPER_ARMS
from simmerge_ray.report.charts import bars_under_legend, grouped_bars, grouped_bars_figure
from simmerge_ray.selector.evaluate import gap_figure

# The demo run's multi-way expert retention (runs/demo/report.json): every bar negative, down to -84%.
RETENTION = {"3way": {"simmerge": -0.753, "random_order": -0.737, "linear": -0.764, "slerp": -0.754,
                      "ties": -0.770, "oracle": -0.607},
             "4way": {"simmerge": -0.824, "random_order": -0.818, "linear": -0.824, "slerp": -0.821,
                      "ties": -0.843, "oracle": -0.700}}


def test_the_legend_check_sees_a_covered_bar() -> None:
    """The old layout (legend inside the axes, lower left, 4 columns) covered bars: the check says which."""
    fig = grouped_bars_figure(RETENTION, "expert retention (%)", "retention")
    fig.axes[0].legend(ncol=4, fontsize=8, loc="lower left")
    assert "simmerge" in bars_under_legend(fig)


def test_grouped_bars_legend_covers_no_bar(tmp_path: Path) -> None:
    fig = grouped_bars_figure(RETENTION, "expert retention (%)", "retention")
    assert bars_under_legend(fig) == []
    (legend,) = [ax.get_legend() for ax in fig.axes]
    assert legend.get_window_extent().x0 > fig.axes[0].get_window_extent().x1  # beside the axes
    assert [t.get_text() for t in legend.get_texts()] == list(RETENTION["3way"])
    path = grouped_bars(RETENTION, tmp_path / "multiway_retention.png", "expert retention (%)", "retention")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_utility_chart_legend_covers_no_bar() -> None:
    """Tall bars on every task (math the tallest, as in the demo) and seven methods."""
    tasks = ("code", "instruct", "math", "multilingual", "rag")
    methods = ("simmerge", *PAPER_ARMS, "linear_aux", "majority", "oracle")
    rng = np.random.default_rng(0)
    utility = {m: {t: float(rng.uniform(0.35, 0.6)) for t in tasks} for m in methods}
    for m in methods:
        utility[m]["math"] = 0.62
        utility[m]["mean"] = float(np.mean([utility[m][t] for t in tasks]))
    fig = gap_figure({"utility": utility, "best_fixed_operator": "linear_aux"}, "utility on held-out pairs")
    assert bars_under_legend(fig) == []
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(methods)
