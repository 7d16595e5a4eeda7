"""Human-readable sizes and rates, shared by the CLI's summaries and the merge progress bar."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB', 3.2e9 -> '2.98 GiB': binary units, three significant figures."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:  # 1000-1023 B reads better as 0.98 KiB
        n /= 1024
        i += 1
    if i == 0:
        return f"{n:.0f} B"
    return f"{n:.{2 if abs(n) < 10 else 1 if abs(n) < 100 else 0}f} {units[i]}"


def human_rate(n_bytes: float, seconds: float) -> str:
    """Bytes over seconds as '12.3 MiB/s' ('-' when no time was measured)."""
    return f"{human_bytes(n_bytes / seconds)}/s" if seconds > 0 else "-"
