"""A text chart of calls per second against the limit, for terminals and the Dagster UI.

Text, because it renders the same in a terminal, in CI logs and in a Dagster
markdown metadata value, with no image pipeline to break.
"""

from __future__ import annotations

import math

_WIDTH = 60
_HEIGHT = 8


def rate_chart(per_second: list[int], limit: float | None, target: float | None) -> str:
    """Columns of '█' for achieved calls/s; '─' marks the target, '═' the limit."""
    if not per_second:
        return "(no calls)"
    columns = _downsample(per_second, _WIDTH)
    top = max([*columns, limit or 0, target or 0, 1])
    lines = []
    for row in range(_HEIGHT, 0, -1):
        low, high = top * (row - 1) / _HEIGHT, top * row / _HEIGHT
        marker = _marker(low, high, limit, target)
        cells = "".join("█" if value >= high - top / (2 * _HEIGHT) else marker for value in columns)
        lines.append(f"{high:8.1f} ┤{cells}")
    seconds = len(per_second)
    lines.append(" " * 9 + "└" + "─" * len(columns))
    lines.append(" " * 10 + f"0 s{' ' * max(1, len(columns) - 8)}{seconds} s")
    legend = ["█ achieved calls/s"]
    if target:
        legend.append(f"─ target {target:,.1f}/s")
    if limit:
        legend.append(f"═ limit {limit:,.1f}/s")
    lines.append(" " * 10 + "   ".join(legend))
    return "\n".join(lines)


def _marker(low: float, high: float, limit: float | None, target: float | None) -> str:
    if limit is not None and low < limit <= high:
        return "═"
    if target is not None and low < target <= high:
        return "─"
    return " "


def _downsample(values: list[int], width: int) -> list[float]:
    """Average neighbouring seconds so a long run still fits the width."""
    if len(values) <= width:
        return [float(v) for v in values]
    step = math.ceil(len(values) / width)
    return [sum(values[i : i + step]) / len(values[i : i + step]) for i in range(0, len(values), step)]
