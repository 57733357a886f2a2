"""Logits only where the loss is (``train.loss_logits: labelled``): same loss and gradients as full logits.

The matrix test trains the second of two tiny tasks twice from the same registry state, once with
``labelled`` and once with ``full``, for every method in METHODS, without and with GeRe replay
(plus GeRe's ``kl``, ``lf`` and dynamic-weight ``tm`` for one method), and compares what the
optimizer receives at every step: the loss ``compute_loss`` returns and every trainable
parameter's gradient. Tolerance (fp32): loss within 1e-5 relative; each gradient tensor within
1e-4 of its largest element (step 2 starts from parameters that may differ by step 1's float
rounding; on CPU the two paths agree bit for bit). A forward hook on the LM head proves the labelled run skipped most
positions.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import task_rows, tiny_overrides, write_jsonl
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cladapt.adapters import METHODS
from cladapt.train.loop import (
    REPLAY_KIND,
    CLTrainer,
    LossOutputs,
    head_mismatch,
    labelled_ce,
    output_head,
    shifted_labels,
    task_and_replay_ce,
)

STEPS = 2  # the first step also checks the head against the full logits; the second is labelled only
TINY: dict[str, dict[str, Any]] = {"inflora": {"method.max_batches": 2}, "gslora": {"method.eval_batches": 1}}
REPLAY_TEXTS = [
    "the film was great and the actor plays sports",
    "a village with an animal and a plant",
    "what is the topic of the following paragraph",
    "the company does business in science and technology",
    "the story of the album is a delight because the plot is good and the review is positive",
]
REPLAY = {"replay.enabled": True, "replay.max_tokens": 12}
CASES = [pytest.param(m, {}, id=m) for m in METHODS.names()]
CASES += [pytest.param(m, REPLAY, id=f"{m}+replay") for m in METHODS.names()]
CASES += [
    pytest.param("lora", {**REPLAY, "replay.loss": loss, **extra}, id=f"lora+replay-{loss}{'-dy' if extra else ''}")
    for loss, extra in (("kl", {}), ("lf", {}), ("tm", {"replay.weight": "dy"}))
]


# --------------------------------------------------------------------------------- units


def test_labelled_ce_equals_full_ce_with_and_without_replay_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.full((4, 7), -100)
    labels[0, 4:6] = torch.tensor([3, 5])
    labels[1, 5:] = torch.tensor([1, 2])
    labels[2, 1:] = torch.randint(0, 11, (6,), generator=g)  # a replay row: every token labelled
    labels[3, 6] = 9
    for kinds in (None, torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, REPLAY_KIND, 0])):
        full = task_and_replay_ce(logits, labels, kinds)
        targets = shifted_labels(labels)
        keep = targets != -100
        rows = None if kinds is None else kinds == REPLAY_KIND
        mixed = rows is not None and bool(rows.any()) and not bool(rows.all())
        replay = rows[:, None].expand_as(keep)[keep] if mixed else None
        assert torch.allclose(labelled_ce(logits[keep], targets[keep], replay), full.to(torch.float32), atol=1e-6)


def test_loss_outputs_give_what_a_full_forward_gives(tiny_loaded) -> None:  # noqa: ANN001
    model, tok, _ = tiny_loaded
    head, why = output_head(model)
    assert head is model.get_output_embeddings() and why == ""
    ids = tok(["the film was great", "a village"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**ids)
        raw = model(**ids, output_hidden_states=True, logits_to_keep=1)
    assert raw.logits.shape[1] == 1
    out = LossOutputs(raw, torch.tensor(0.0), head=head)
    rows = torch.tensor([False, True])
    with torch.no_grad():
        torch.testing.assert_close(out.row_logits(rows), full.logits[rows])
        torch.testing.assert_close(out.logits, full.logits)
        torch.testing.assert_close(out["logits"], full.logits)
    assert out.hidden_states is raw.hidden_states and out.answer_ce == 0.0
    assert head_mismatch(full.logits, full.logits * 1.0) is None
    assert "not the LM head" in head_mismatch(full.logits, 30 * torch.tanh(full.logits / 30) + 1)


# ---------------------------------------------------------------------- train both ways


class _Capture:
    """The loss ``compute_loss`` returns and the gradients the optimizer steps with, per step."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model, self.losses, self.grads = model, [], []
        self.head_rows, self.step_head_rows = 0, []  # LM-head positions so far / per optimizer step
        original = CLTrainer.compute_loss

        def compute_loss(trainer: CLTrainer, *args: Any, **kwargs: Any) -> Any:
            loss = original(trainer, *args, **kwargs)
            self.losses.append(float(loss.detach()))
            return loss

        monkeypatch.setattr(CLTrainer, "compute_loss", compute_loss)

    def __enter__(self) -> _Capture:
        def grab(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            self.grads.append({
                n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None
            })
            self.step_head_rows.append(self.head_rows)
            self.head_rows = 0

        def count(_m: Any, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            self.head_rows += args[0].numel() // args[0].shape[-1]

        self._handles = [
            register_optimizer_step_pre_hook(grab),
            self.model.get_output_embeddings().register_forward_hook(count),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def _train(method: str, store: Any, task: str, files: dict[str, str], cfg: Any, loaded: Any) -> Any:
    from cladapt.train.extensions import build_extensions
    from cladapt.train.forget import forget_task
    from cladapt.train.run import train_task

    other = "sentiment" if task == "topics" else "topics"
    if METHODS.get(method).forgetting:
        return forget_task(store, f"forget-{task}", [files[task]], [files[other]], cfg, loaded=loaded)
    return train_task(store, task, [files[task]], cfg, loaded=loaded, extensions=build_extensions(cfg, store))


@pytest.fixture(scope="module")
def shared(tiny_base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Task files, the replay texts and, per method, a registry holding its first task (made once)."""
    root = tmp_path_factory.mktemp("labelled-logits")
    files = {k: str(write_jsonl(root / f"{k}.jsonl", task_rows(k, 12))) for k in ("sentiment", "topics")}
    texts = str(write_jsonl(root / "general.jsonl", [{"text": t} for t in REPLAY_TEXTS]))
    return {"root": root, "files": files, "texts": texts, "first": {}}


@pytest.mark.parametrize(("method", "extra"), CASES)
def test_labelled_logits_match_full_logits(
    method: str, extra: dict[str, Any], shared: dict[str, Any], tiny_base_path: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cladapt.base_model import load
    from cladapt.config import load_config
    from cladapt.registry.store import Store

    files = shared["files"]

    def config(mode: str, steps: int = STEPS, more: dict[str, Any] = extra) -> Any:
        over = tiny_overrides(**{"train.max_steps": steps, "train.save_steps": 100, "train.max_grad_norm": 0.0,
                                 "train.loss_logits": mode, **TINY.get(method, {}), **more,
                                 **({"replay.texts": shared["texts"]} if more else {})})
        return load_config(method=method, overrides=[*over, f"base_model={tiny_base_path}"])[0]

    loaded = load(str(tiny_base_path))
    if method not in shared["first"]:  # the history task 2 builds on (trained once per method)
        first = Store.init(shared["root"] / f"first-{method}")
        _train(method, first, "sentiment", files, config("full", 1, {}), loaded)
        shared["first"][method] = first.root
    runs: dict[str, _Capture] = {}
    for mode in ("labelled", "full"):
        shutil.copytree(shared["first"][method], tmp_path / f"reg-{mode}")
        with _Capture(loaded[0], monkeypatch) as cap:
            _train(method, Store.open(tmp_path / f"reg-{mode}"), "topics", files, config(mode), loaded)
        monkeypatch.undo()
        runs[mode] = cap
    lab, full = runs["labelled"], runs["full"]
    assert len(lab.grads) == len(full.grads) == STEPS and len(lab.losses) >= STEPS
    assert lab.losses == pytest.approx(full.losses, rel=1e-5)
    worst = 0.0
    for step, (gl, gf) in enumerate(zip(lab.grads, full.grads, strict=True), start=1):
        assert gl.keys() == gf.keys() and any("lora" in n for n in gl)
        assert any(float(g.abs().max()) > 0 for g in gf.values())
        for name in gf:
            scale = float(gf[name].abs().max())
            err = float((gl[name] - gf[name]).abs().max())
            assert err <= 1e-4 * scale + 1e-9, f"step {step} {name}: {err:.3g} vs max {scale:.3g}"
            worst = max(worst, err / scale if scale else 0.0)
    print(f"largest gradient difference / largest gradient element: {worst:.2e}")
    # in the labelled-only step the LM head saw fewer positions (replay rows are labelled at every
    # position; gslora's own forget-set forward runs full logits in both runs)
    limit = 1.0 if extra or METHODS.get(method).forgetting else 0.5
    assert lab.step_head_rows[-1] < full.step_head_rows[-1] * limit, (lab.step_head_rows, full.step_head_rows)


# ------------------------------------------------------------------------------ fallback


def _scaled_logits(model: torch.nn.Module) -> None:
    """Make ``model``'s logits half the LM head's output (like Cohere's logit_scale)."""
    cls = type(model)

    class Scaled(cls):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, logits_to_keep: int | torch.Tensor = 0, **kwargs: Any) -> Any:
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model.__class__ = Scaled


def _loss(store_dir: Path, cfg_mode: str, files: dict[str, str], base: Path, loaded: Any) -> float:
    from cladapt.config import load_config
    from cladapt.registry.store import Store
    from cladapt.train.run import train_task

    over = tiny_overrides(**{"train.max_steps": 2, "train.loss_logits": cfg_mode})
    cfg = load_config(method="lora", overrides=[*over, f"base_model={base}"])[0]
    rec = train_task(Store.init(store_dir), "sentiment", [files["sentiment"]], cfg, loaded=loaded)
    return float(rec.manifest.train_stats["train_loss"])


def test_model_whose_logits_are_not_the_head_falls_back_to_full(
    tiny_base_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cladapt.base_model import load

    files = {"sentiment": str(write_jsonl(tmp_path / "s.jsonl", task_rows("sentiment", 8)))}
    loaded = load(str(tiny_base_path))
    _scaled_logits(loaded[0])
    with caplog.at_level(logging.WARNING, logger="cladapt.train.loop"):
        labelled = _loss(tmp_path / "a", "labelled", files, tiny_base_path, loaded)
    assert "not the LM head of the last hidden state" in caplog.text
    full = _loss(tmp_path / "b", "full", files, tiny_base_path, loaded)
    assert labelled == pytest.approx(full, rel=1e-6)


def test_forward_without_logits_to_keep_falls_back(tiny_loaded) -> None:  # noqa: ANN001
    model = tiny_loaded[0]
    cls = type(model)

    class NoKeep(cls):  # type: ignore[misc, valid-type]
        def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.__class__ = NoKeep
    head, why = output_head(model)
    assert head is None and "takes no logits_to_keep" in why
