"""Training runs checkpoint into a folder of their own, claimed while they run.

Two identical trains (same task, data and config) started together used to share
``.work/runs/<key>``: a later start deleted the earlier run's checkpoints. Each run now claims its
own folder (``Store.claim_run``); ``--resume`` takes over a killed run's folder, never a live one's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides
from transformers import TrainerCallback

from cladapt.registry.lock import Claim, claim_path
from cladapt.registry.store import Store


class Spy(TrainerCallback):
    """Records the run folder the Trainer writes to, whether it is claimed, and the starting step."""

    def __init__(self, die_at: int | None = None) -> None:
        self.die_at = die_at
        self.seen: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        out = Path(args.output_dir)
        probe = Claim.take(claim_path(out))  # None: a live process (this run) holds the folder
        if probe is not None:
            probe.release()
        self.seen.update(out=out, claimed=probe is None, start_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self.die_at is not None and state.global_step >= self.die_at:
            raise KeyboardInterrupt("killed")  # what an interrupted run looks like to train_task


def _cfg(tiny_base_path: Path, **extra: object):  # noqa: ANN202
    from cladapt.config import load_config

    over = tiny_overrides(**{"train.max_steps": 4, "train.save_steps": 2, **extra})
    return load_config(overrides=[f"base_model={tiny_base_path}", *over])[0]


def _key(cfg: Any, data: Path) -> str:
    from cladapt.data.rows import load_examples
    from cladapt.train.run import run_key

    return run_key("sentiment", load_examples([data]).sha256, cfg)


def _checkpoint(folder: Path, step: int) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def test_identical_concurrent_runs_do_not_share_a_folder(
    store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path]
) -> None:
    from cladapt.train.run import train_task

    cfg = _cfg(tiny_base_path)
    live = store.claim_run("sentiment", _key(cfg, two_tasks["sentiment"]))  # an identical run, still training
    ckpt = _checkpoint(live.path, 2)
    spy = Spy()
    train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg, loaded=tiny_loaded, callbacks=[spy])
    assert spy.seen["out"] != live.path and spy.seen["out"].parent == live.path.parent
    assert spy.seen["claimed"], "the run's folder was not claimed while it trained"
    assert (ckpt / "trainer_state.json").is_file()  # the live run's checkpoints survive the second start
    assert not spy.seen["out"].exists() and not claim_path(spy.seen["out"]).exists()  # committed: cleaned up
    assert [r.version for r in store.list("sentiment")] == [1]
    live.release()


def test_resume_takes_over_only_a_dead_runs_folder(
    store: Store, tiny_base_path: Path, tiny_loaded: Any, two_tasks: dict[str, Path]
) -> None:
    from cladapt.train.run import train_task

    cfg = _cfg(tiny_base_path)
    data = [str(two_tasks["sentiment"])]
    live = store.claim_run("sentiment", _key(cfg, two_tasks["sentiment"]))  # an identical run, still training
    dying = Spy(die_at=3)
    with pytest.raises(KeyboardInterrupt):
        train_task(store, "sentiment", data, cfg, loaded=tiny_loaded, callbacks=[dying])
    dead = dying.seen["out"]
    assert (dead / "checkpoint-2" / "trainer_state.json").is_file() and store.list("sentiment") == []
    assert store.leftovers() == [str(dead.relative_to(store.root))]  # unclaimed: resumable

    _checkpoint(live.path, 4)
    os.utime(live.path)  # the live run's folder is the newest
    spy = Spy()
    train_task(store, "sentiment", data, cfg, loaded=tiny_loaded, callbacks=[spy], resume=True)
    assert spy.seen["out"] == dead and spy.seen["claimed"]
    assert spy.seen["start_step"] == 2  # continued from the dead run's checkpoint, not the live one's
    assert (live.path / "checkpoint-4").is_dir() and not dead.exists()
    rec = store.get("sentiment")
    assert rec.manifest.train_stats["steps"] == 4
    live.release()
