"""Terminal output for the CLI: a progress bar and small tables.

Kept apart from the commands so that they read as the steps they take.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import pyarrow as pa

from pipeline.backfill import Progress


class ProgressBar:
    """Items done, chunks done and the live rate: redrawn in place on a terminal,
    one line per tenth of the work in a log file (so CI logs stay readable)."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, width: int = 30):
        self._label = label
        self._stream = stream
        self._width = width
        self._started = time.monotonic()
        self._start_done: int | None = None
        self._last_tenth = -1
        self._live = stream.isatty()

    def __call__(self, progress: Progress) -> None:
        if self._start_done is None:  # items finished by an earlier run do not count towards the rate
            self._start_done = progress.items_done - progress.last_chunk_items
        tenth = 10 * progress.items_done // max(progress.items_total, 1)
        if not self._live and tenth == self._last_tenth:
            return
        self._last_tenth = tenth
        filled = round(self._width * progress.items_done / max(progress.items_total, 1))
        rate = (progress.items_done - self._start_done) / max(time.monotonic() - self._started, 1e-6)
        line = (
            f"{self._label} [{'#' * filled}{'.' * (self._width - filled)}] "
            f"{progress.items_done:,}/{progress.items_total:,} items  "
            f"chunks {progress.chunks_done}/{progress.chunks_total}  {rate:,.0f} items/s"
        )
        self._stream.write(f"\r{line} " if self._live else f"{line}\n")
        self._stream.flush()

    def close(self) -> None:
        if self._live:
            self._stream.write("\n")
            self._stream.flush()


def format_table(table: pa.Table, max_rows: int = 40, max_width: int = 60) -> str:
    """A plain-text table; long cells are cut so one row stays one line."""
    columns = table.column_names
    rows = [[_cell(v, max_width) for v in row.values()] for row in table.slice(0, max_rows).to_pylist()]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows:,} more rows")
    return "\n".join(lines)


def _cell(value: object, max_width: int) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"
