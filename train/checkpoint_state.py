"""Training checkpoints without pickle: optimizer, scheduler, scaler and RNG state as safetensors + JSON.

``transformers.Trainer`` writes ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` and
``training_args.bin`` with ``torch.save`` and reads them back with torch's unpickler on
``resume_from_checkpoint``. Even with ``weights_only=True`` that is unpickling files found on disk,
which cladapt never does. :class:`SafeCheckpointMixin` replaces those five files: every state is
split into its tensors (one ``<name>.safetensors``) and everything else (one ``<name>.json``:
numbers, strings, and the structure with typed markers for tuples, integer keys and numpy arrays),
and resuming reads only those. The adapter weights themselves are already safetensors (PEFT's
``adapter_model.safetensors``), and the Trainer state is already JSON.

DeepSpeed checkpoints its engine in its own (pickled) format; a run under DeepSpeed is therefore not
resumable and :func:`check_resumable` says so before any work starts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cladapt.errors import CladaptError

#: the pickle files ``transformers.Trainer`` would write into a checkpoint; never read, never written
PICKLE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "training_args.bin")


# ---------------------------------------------------------------------------- state <-> files


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` (keyed by their path)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # optimizer state is keyed by parameter index: keep the key types
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CladaptError(f"cannot checkpoint a {type(obj).__name__} at {path!r} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(state: Any, folder: str | os.PathLike[str], name: str) -> None:
    """Write ``state`` as ``<name>.safetensors`` (its tensors) and ``<name>.json`` (the rest)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded))


def has_state(folder: str | os.PathLike[str], name: str) -> bool:
    return (Path(folder) / f"{name}.json").is_file() and (Path(folder) / f"{name}.safetensors").is_file()


def load_state(folder: str | os.PathLike[str], name: str) -> Any:
    """Read a state written by :func:`save_state` (safetensors and JSON only)."""
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"), device="cpu")
        return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)
    except (OSError, ValueError, KeyError) as err:
        raise CladaptError(f"checkpoint state {folder / name}.json/.safetensors is unreadable: {err}") from err


# ---------------------------------------------------------------------------- the Trainer mixin


def check_resumable(checkpoint: Path | None, *, deepspeed: object) -> None:
    """Refuse a resume cladapt cannot do without unpickling, before anything is loaded."""
    if checkpoint is None:
        return
    if deepspeed:
        raise CladaptError(
            f"cannot resume {checkpoint} under DeepSpeed: its engine checkpoints are pickles, which cladapt "
            "never loads. Start the run again without --resume."
        )
    if not has_state(checkpoint, "optimizer"):
        found = [f for f in PICKLE_FILES if (checkpoint / f).exists()]
        raise CladaptError(
            f"checkpoint {checkpoint} has no optimizer.safetensors/.json"
            + (f" (only pickle files: {', '.join(found)}, which cladapt never loads)" if found else "")
            + ". Start the run again without --resume."
        )


class SafeCheckpointMixin:
    """Overrides ``transformers.Trainer``'s checkpoint state I/O so that no pickle is written or read.

    Mixed into :class:`cladapt.train.loop.CLTrainer` before ``Trainer``. The method names are
    ``Trainer``'s own hooks (stable across transformers 4.4x-5.x).
    """

    args: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    is_deepspeed_enabled: bool

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:  # the Trainer pickles its arguments here; keep them as JSON instead
            (out / "training_args.bin").unlink(missing_ok=True)
            (out / "training_args.json").write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:  # DeepSpeed saves its engine its own way (not resumable here)
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
            return
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")

    def _save_rng_state(self, output_dir: str) -> None:
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        save_state(states, output_dir, self._rng_name())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.is_deepspeed_enabled:
            return
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and has_state(checkpoint, "scaler"):
            scaler.load_state_dict(load_state(checkpoint, "scaler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, self._rng_name()):
            return  # e.g. resumed with another number of processes: data order continues, RNG restarts
        states = load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            cuda = list(states["cuda"])
            torch.cuda.random.set_rng_state_all(cuda[: torch.cuda.device_count()])
