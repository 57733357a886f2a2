"""Evaluation progress: one rich display per evaluation run, a bar per (task, model) pass."""

from __future__ import annotations

from cladapt.evaluation.progress import EvalProgress


def test_bars_count_rows_inside_one_display() -> None:
    progress = EvalProgress(enabled=True)
    with progress:
        with progress.bar("sentiment (new model)", 10) as advance:
            advance(4)
            advance(6)
            (task,) = progress._live.tasks
            assert (task.description, task.completed, task.total) == ("sentiment (new model)", 10, 10)
        assert progress._live.tasks == []  # a finished pass leaves the display
        with progress.bar("topics (base model)", 3) as advance:
            advance(3)
            assert progress._live.tasks[0].completed == 3
    assert progress._live is None


def test_off_terminal_the_callback_does_nothing() -> None:
    progress = EvalProgress(enabled=False)
    with progress.bar("t", 5) as advance:
        advance(5)
        assert progress._live is None
