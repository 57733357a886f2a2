"""The training progress bar's log lines: named, rounded numbers instead of the Trainer's raw dicts.

``transformers``' :class:`~transformers.trainer_callback.ProgressCallback` writes every log event
into the tqdm bar as a Python dict (``{'loss': '3.89', 'grad_norm': ...}``), the loss terms of
cladapt's plugins included. :class:`TrainingProgress` replaces it and writes one aligned line per
event (``step 20/100  loss 3.890  ce 3.702  olora/orth 0.188  lr 1.00e-03``); the numbers go to the
Trainer's ``report_to`` integrations untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.trainer_callback import ProgressCallback

#: keys left out of the line (the Trainer's bookkeeping, not progress)
_HIDDEN = ("total_flos",)


def _number(key: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    if key in ("learning_rate", "lr"):
        return f"{value:.2e}"
    if key == "epoch":
        return f"{value:.2f}"
    if key.endswith(("runtime", "_per_second")):
        return f"{value:.1f}"
    return f"{value:.3f}"  # losses, loss terms, grad_norm


def format_logs(step: int, max_steps: int, logs: Mapping[str, Any]) -> str:
    """One log event as ``step N/M  key value  ...`` (``learning_rate`` shown as ``lr``)."""
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    for key, value in logs.items():
        if key in _HIDDEN:
            continue
        name = "lr" if key == "learning_rate" else key
        parts.append(f"{name} {_number(key, value)}")
    return "  ".join(parts)


class TrainingProgress(ProgressCallback):
    """The Trainer's progress bar with :func:`format_logs` lines (process 0 only, like its parent)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_logs(state.global_step, state.max_steps, logs))


def use_training_progress(trainer: Any) -> None:
    """Swap the Trainer's default progress callback for :class:`TrainingProgress` (when it shows one)."""
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TrainingProgress)
