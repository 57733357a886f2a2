"""``--resume`` never reads pickle: optimizer, scheduler and RNG state are safetensors + JSON.

A run killed after its step-2 checkpoint and resumed must end with exactly the adapter of an
uninterrupted run (so the optimizer moments, the scheduler position and the RNG state were all
restored), while ``torch.load`` is never called and no pickle file exists in any checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from transformers import TrainerCallback

from cladapt.errors import CladaptError
from cladapt.registry.store import Store
from cladapt.train.checkpoint_state import PICKLE_FILES, check_resumable, load_state, save_state


class DieAfter(TrainerCallback):
    """Interrupts the run at the end of step ``step`` (after the checkpoint of the step before)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step >= self.step:
            raise KeyboardInterrupt("killed")


def _cfg(tiny_base_path: Path):  # noqa: ANN202
    from cladapt.config import load_config

    # dropout on, so the restored RNG state matters for the result
    over = tiny_overrides(**{"train.max_steps": 4, "train.save_steps": 2, "lora.dropout": 0.1})
    return load_config(overrides=[f"base_model={tiny_base_path}", *over])[0]


def _weights(store: Store) -> dict[str, torch.Tensor]:
    return load_file(str(store.adapter_dir("sentiment") / "adapter_model.safetensors"))


def test_resumed_run_equals_uninterrupted_run_without_pickle(
    tmp_path: Path, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cladapt.train.run import train_task

    cfg = _cfg(tiny_base_path)
    data = [str(two_tasks["sentiment"])]
    whole = Store.init(tmp_path / "whole")
    train_task(whole, "sentiment", data, cfg, loaded=tiny_loaded)

    cut = Store.init(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train_task(cut, "sentiment", data, cfg, loaded=tiny_loaded, callbacks=[DieAfter(3)])
    (ckpt,) = list((cut.root / ".work" / "runs").rglob("checkpoint-2"))
    files = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.safetensors"} <= files
    assert not files & set(PICKLE_FILES), files
    assert cut.list("sentiment") == []

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load called while resuming")

    monkeypatch.setattr(torch, "load", no_pickle)
    train_task(cut, "sentiment", data, cfg, loaded=tiny_loaded, resume=True)
    assert cut.get("sentiment").manifest.train_stats["steps"] == 4
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_state_round_trip_keeps_types(tmp_path: Path) -> None:
    import numpy as np

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 1e-3, "foreach": None}],
             "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.999)
    torch.testing.assert_close(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][1].tolist() == [0, 1, 2, 3]


def test_a_pickle_only_checkpoint_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CladaptError, match=r"optimizer\.pt.*never loads.*without --resume"):
        check_resumable(tmp_path, deepspeed=None)
    with pytest.raises(CladaptError, match="DeepSpeed"):
        check_resumable(tmp_path, deepspeed="zero2.json")
