"""The build's progress bar: documents with an ETA, passages and passages/s."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class BuildProgress:
    """Context manager; `update(docs_done, passages, embedded_now)`. Silent when disabled."""

    def __init__(self, total_docs: int | None, enabled: bool = True) -> None:
        # a live bar only on a terminal: in logs and pipes the summary line says it all
        self.enabled = enabled and sys.stderr.isatty()
        self._t0 = time.perf_counter()
        self._embedded = 0
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]building"), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("docs"),
                TextColumn("{task.fields[passages]} passages"), TextColumn("{task.fields[rate]:.1f} passages/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=True,  # the summary replaces the bar
            )
            self._task = self._progress.add_task("build", total=total_docs, passages=0, rate=0.0)

    def __enter__(self) -> "BuildProgress":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, docs_done: int, passages: int, embedded_now: int) -> None:
        self._embedded += embedded_now
        if self.enabled:
            rate = self._embedded / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._task, completed=docs_done, passages=passages, rate=rate)
