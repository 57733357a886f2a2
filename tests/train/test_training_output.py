"""Training output: the progress bar carries named, rounded log lines, never the Trainer's raw dicts."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import tiny_overrides

from cladapt.config import load_config
from cladapt.train.progress import TrainingProgress, format_logs
from cladapt.train.run import train_task


def test_log_lines_name_and_round_every_number() -> None:
    logs = {"loss": 3.8896876176198325, "grad_norm": 0.51234, "learning_rate": 0.001, "epoch": 0.5,
            "olora/orth": 0.0123456, "total_flos": 1.0e9, "train_runtime": 12.345}
    assert format_logs(2, 4, logs) == (
        "step 2/4  loss 3.890  grad_norm 0.512  lr 1.00e-03  epoch 0.50  olora/orth 0.012  train_runtime 12.3"
    )
    assert format_logs(7, -1, {"loss": 1.0}) == "step 7  loss 1.000"


def test_a_run_writes_rounded_lines_into_the_bar(store, tiny_loaded, tiny_base_path: Path, two_tasks, capfd) -> None:
    cfg = load_config(overrides=[*tiny_overrides(), f"base_model={tiny_base_path}"])[0]
    train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, loaded=tiny_loaded)
    captured = capfd.readouterr()
    err = captured.out + captured.err  # tqdm.write prints to stdout, the bar to stderr
    assert "{'loss'" not in err and "'grad_norm'" not in err  # no raw dicts
    lines = re.findall(r"step (\d+)/3  loss (\d+\.\d+)", err)
    assert [s for s, _ in lines] == ["1", "2", "3"]  # logging_steps 1: one line per step
    assert all(len(v.split(".")[1]) == 3 for _, v in lines)
    assert re.search(r"step 3/3 .*train_runtime \d+\.\d\b", err)  # the end-of-training summary too


def test_the_default_callback_is_replaced_once() -> None:
    from transformers.trainer_callback import ProgressCallback

    from cladapt.train.progress import use_training_progress

    class Handler:
        callbacks = [ProgressCallback()]

    class FakeTrainer:
        callback_handler = Handler()

        def remove_callback(self, cls):
            self.callback_handler.callbacks = [c for c in self.callback_handler.callbacks if type(c) is not cls]

        def add_callback(self, cls):
            self.callback_handler.callbacks.append(cls())

    trainer = FakeTrainer()
    use_training_progress(trainer)
    use_training_progress(trainer)
    assert [type(c) for c in trainer.callback_handler.callbacks] == [TrainingProgress]
