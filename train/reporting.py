"""Where a run's training logs go besides the registry: TensorBoard, Weights & Biases, MLflow (``train.report_to``).

The Trainer's own integrations do the writing (its ``report_to``); cladapt only decides where
TensorBoard writes, because nothing may land outside the registry unless the user names the place:

- default: ``logs/`` in the run's folder of the registry (``.work/runs/<task>/<key>``), watched live
  with ``tensorboard --logdir``; when the version is committed the event files are kept with it
  (``logs/tensorboard/`` in the version folder, checksummed like every other file), because the
  run's folder is deleted then;
- ``train.logging_dir``: the user's folder, written there and nowhere else.

W&B and MLflow send to the service their own settings name (``WANDB_*``, ``MLFLOW_TRACKING_URI``);
they are refused with a clear message when their package is not installed.

The training-loss curve (step, loss) is recorded in the manifest's ``train_stats`` whatever
``report_to`` says (:class:`LossCurve`), so the report can draw it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from cladapt.errors import ConfigError, Issue

if TYPE_CHECKING:
    from cladapt.config import TrainSettings
    from cladapt.registry.staging import Staging

#: report_to name -> the package its Trainer integration needs
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
KEPT_LOGS = "logs/tensorboard"


def tensorboard_dir(train: TrainSettings, run_dir: Path) -> Path:
    """Where TensorBoard writes: ``train.logging_dir``, else ``logs/`` in the run's folder."""
    return Path(train.logging_dir).expanduser() if train.logging_dir else run_dir / "logs"


def report_settings(train: TrainSettings, run_dir: Path) -> tuple[list[str], list[Any]]:
    """(the Trainer's ``report_to``, extra callbacks) for ``train.report_to``.

    TensorBoard gets its own callback pointed at :func:`tensorboard_dir` (transformers would
    otherwise pick ``<output_dir>/runs/<date>``); the other integrations go through ``report_to``.

    Raises:
        ConfigError: naming ``train.report_to`` when an integration's package is missing.
    """
    missing = [name for name in train.report_to if importlib.util.find_spec(_PACKAGES[name]) is None]
    if missing:
        raise ConfigError(
            [Issue("train.report_to", f"{name} is not installed (pip install {_PACKAGES[name]})") for name in missing],
            hint="install it, or drop it from train.report_to (none: the registry alone)",
        )
    report_to = [name for name in train.report_to if name != "tensorboard"]
    callbacks: list[Any] = []
    if "tensorboard" in train.report_to:
        from transformers.integrations import TensorBoardCallback

        callback = TensorBoardCallback()
        callback.logging_dir = str(tensorboard_dir(train, run_dir))
        callbacks.append(callback)
    return report_to or ["none"], callbacks


def keep_logs(staging: Staging, train: TrainSettings, run_dir: Path) -> int:
    """Copy the run's TensorBoard files into the staged version (default folder only); returns how many.

    A ``train.logging_dir`` of the user's stays where it is: it is theirs, not the registry's.
    """
    if "tensorboard" not in train.report_to or train.logging_dir:
        return 0
    source = tensorboard_dir(train, run_dir)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()) if source.is_dir() else []
    for path in files:
        target = staging.path(f"{KEPT_LOGS}/{path.relative_to(source).as_posix()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return len(files)


class LossCurve(TrainerCallback):  # type: ignore[misc]
    """Writes ``loss_curve``, [[optimizer step, training loss], ...], into ``target`` (the run's train_stats)
    when training ends: from the Trainer's own log history, so a resumed run's curve covers every step."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.target["loss_curve"] = [[int(h["step"]), round(float(h["loss"]), 6)] for h in state.log_history
                                     if isinstance(h.get("loss"), (int, float)) and "step" in h]
