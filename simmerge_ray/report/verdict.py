"""The one-line verdict that the selector's evaluation, the demo and `simmerge transfer` end with."""

from __future__ import annotations


def verdict_line(gain: float, best_fixed: str, share_of_oracle: float | None, where: str = "") -> str:
    """'verdict: SimMerge beats the best fixed arm (ties) by 3.1 points ...': `gain` is SimMerge's
    mean utility minus the best fixed arm's, as a fraction."""
    points = 100 * gain
    if points > 0:
        what = f"beats the best fixed arm ({best_fixed}) by {points:.1f} points"
    elif points == 0:
        what = f"ties with the best fixed arm ({best_fixed})"
    else:
        what = f"does not beat the best fixed arm ({best_fixed}): {points:+.1f} points"
    share = "" if share_of_oracle is None else f"; {100 * share_of_oracle:.0f}% of the oracle"
    return f"verdict: SimMerge {what}{where}{share}"
