"""Length-grouped batches (``train.group_by_length``): seeded, every row once per epoch, less padding."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides, write_jsonl

from cladapt.errors import ConfigError
from cladapt.train.sampler import LengthGroupedSampler, padding_fraction


def _mixed_lengths(n: int = 203, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(8, 40), rng.randint(100, 400)]) for _ in range(n)]


def test_same_seed_and_epoch_same_order_else_different() -> None:
    lengths = _mixed_lengths()
    a = LengthGroupedSampler(lengths, batch_size=8, window=4, seed=3)
    b = LengthGroupedSampler(lengths, batch_size=8, window=4, seed=3)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) == list(b) != first_a  # the next epoch: same again for both, but a new order
    a.set_epoch(0)
    assert list(a) == first_a  # the trainer's set_epoch (and --resume) replays an epoch exactly
    assert list(LengthGroupedSampler(lengths, batch_size=8, window=4, seed=4)) != first_a


@pytest.mark.parametrize(("n", "batch", "window"), [(203, 8, 4), (64, 8, 1), (7, 4, 100), (1, 3, 2)])
def test_every_row_once_per_epoch_with_aligned_batches(n: int, batch: int, window: int) -> None:
    lengths = _mixed_lengths(n)
    sampler = LengthGroupedSampler(lengths, batch_size=batch, window=window, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(n)) and len(sampler) == n
        batches = sampler.batches(epoch)
        assert [i for b in batches for i in b] == order
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch


def test_grouping_reduces_padding_on_mixed_lengths() -> None:
    lengths = _mixed_lengths()
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    before = padding_fraction(lengths, shuffled, 8)
    after = padding_fraction(lengths, list(LengthGroupedSampler(lengths, batch_size=8, window=8, seed=0)), 8)
    assert before > 0.4 and after < before / 3, (before, after)
    # a window of one batch sorts nothing: about as much padding as a plain shuffle
    one = padding_fraction(lengths, list(LengthGroupedSampler(lengths, batch_size=8, window=1, seed=0)), 8)
    assert one > before * 0.7
    assert padding_fraction([5, 5, 5], [0, 1, 2], 2) == 0.0
    assert padding_fraction([2, 4], [0, 1], 2) == pytest.approx(0.25)


def test_batch_order_is_not_sorted_by_length() -> None:
    lengths = list(range(10, 10 + 160))
    batches = LengthGroupedSampler(lengths, batch_size=4, window=40, seed=0).batches()
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_config_field_is_typed() -> None:
    from cladapt.config import load_config

    cfg, _ = load_config(overrides=["train.group_by_length=true", "train.length_window=4"])
    assert cfg.train.group_by_length is True and cfg.train.length_window == 4
    assert cfg.train.loss_logits == "labelled"
    for bad in ("train.length_window=0", "train.group_by_length=sometimes", "train.loss_logits=some"):
        with pytest.raises(ConfigError):
            load_config(overrides=[bad])


# ----------------------------------------------------------------------- in a training run


def _rows(n: int = 24) -> list[dict[str, str]]:
    short, long_ = "the film was great", " ".join(["the story of the album is a delight because the plot is good"] * 6)
    instr = "What is the sentiment of the following paragraph? Option: positive, negative\n"
    return [{"instruction": instr, "input": f"{short if i % 2 else long_} {i}", "output": ["positive", "negative"][i % 2]}
            for i in range(n)]


def _train_and_measure(store_dir: Path, data: Path, base: Path, loaded: Any, **extra: Any) -> tuple[int, float]:
    """Rows the decoder saw in training forwards and the padded share of their input grid, one epoch."""
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.extensions import build_extensions
    from cladapt.train.run import train_task

    seen = {"rows": 0, "real": 0, "grid": 0}

    def count(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():  # scoring after training (signatures, evaluation)
            return
        mask = kwargs["attention_mask"]
        seen["rows"] += mask.shape[0]
        seen["real"] += int(mask.sum())
        seen["grid"] += mask.numel()

    over = tiny_overrides(**{"train.max_steps": -1, "train.epochs": 1, "train.save_steps": 100, **extra})
    cfg = load_config(overrides=[*over, f"base_model={base}"])[0]
    handle = loaded[0].get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    try:
        store = Store.init(store_dir)
        train_task(store, "sentiment", [str(data)], cfg, loaded=loaded, extensions=build_extensions(cfg, store))
    finally:
        handle.remove()
    return seen["rows"], 1 - seen["real"] / seen["grid"]


def test_group_by_length_in_training_sees_every_row_with_less_padding(
    tiny_base_path: Path, tiny_loaded: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_jsonl(tmp_path / "mixed.jsonl", _rows())
    plain_rows, plain_pad = _train_and_measure(tmp_path / "a", data, tiny_base_path, tiny_loaded)
    rows, pad = _train_and_measure(tmp_path / "b", data, tiny_base_path, tiny_loaded,
                                   **{"train.group_by_length": True, "train.length_window": 6})
    assert plain_rows == rows == 24
    assert pad < plain_pad / 2, (plain_pad, pad)
    # with replay rows mixed in it is not applied (GeRe weights task and replay rows per batch)
    general = ["the film was great and the actor plays sports", "a village with an animal", "answer yes or no"]
    texts = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in general])
    with caplog.at_level(logging.INFO, logger="cladapt.train.loop"):
        _train_and_measure(tmp_path / "c", data, tiny_base_path, tiny_loaded,
                           **{"train.group_by_length": True, "replay.enabled": True, "replay.texts": str(texts),
                              "replay.max_tokens": 8})
    assert "group_by_length is not applied" in caplog.text
