"""A rich progress display for evaluation: one bar per (task, model) scored, rows as the unit.

Evaluation can take minutes (every earlier task, the base model, the model before); a bar per
pass says where it is and how fast it goes. The display is drawn only on an interactive terminal
and in process 0, so logs, CI output and other processes stay plain; the per-pass result is
logged either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from cladapt import distributed


class EvalProgress:
    """``with progress:`` shows the display; ``with progress.bar(label, rows) as advance:`` adds a bar."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._live: Any = None
        self._depth = 0

    def _show(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return sys.stderr.isatty() and distributed.is_main()

    def __enter__(self) -> EvalProgress:
        self._depth += 1
        if self._depth == 1 and self._show():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth == 0 and self._live is not None:
            self._live.stop()
            self._live = None

    @contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A callback advancing a bar of ``total`` rows by the rows just finished (a no-op when not shown)."""
        with self:
            live = self._live
            if live is None:
                yield lambda n: None
                return
            task = live.add_task(label, total=max(1, total))
            try:
                yield lambda n: live.advance(task, n)
            finally:
                live.remove_task(task)
