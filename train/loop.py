"""``CLTrainer``: the one trainer. It implements the fixed step order of methods.md §0.2.

* ``compute_loss``: forward pass, task cross-entropy on answer tokens, then every plugin's named
  ``extra_losses``; a duplicate term name is an error; every term is logged; the sum is returned.
* per real optimizer step (``transformers.Trainer`` has already accumulated and clipped):
  ``pre_step`` of every plugin, ``optimizer.step()``, ``post_step`` of every plugin. This uses
  the Trainer's own ``on_pre_optimizer_step`` / ``on_optimizer_step`` callback events, so it holds
  under accelerate and DeepSpeed too.

Checkpoints, ``--resume``, gradient accumulation, mixed precision and multi-process training come
from ``transformers.Trainer``. Nothing here knows a method by name.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from cladapt.adapters.base import TrainingPlugin
from cladapt.train.chat import IGNORE_INDEX

logger = logging.getLogger(__name__)

#: batch keys the model's forward does not take; plugins may read them in ``extra_losses``
SIDE_KEYS = ("sample_kind", "row_index")
#: ``sample_kind`` value of replay rows (task rows are 0)
REPLAY_KIND = 1


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (answer) tokens, computed in fp32.

    The labels are shifted (padded with -100 at the end) rather than the logits sliced: slicing
    ``logits[:, :-1]`` would copy the whole ``[batch, seq, vocab]`` tensor every step.
    """
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def task_and_replay_ce(logits: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with task and replay rows weighted equally per batch (GeRe's rule, methods.md §5).

    Without replay rows this is the plain answer-token CE.
    """
    if kinds is None or not bool((kinds == REPLAY_KIND).any()):
        return answer_ce(logits, labels)
    replay = kinds == REPLAY_KIND
    if bool(replay.all()):
        return answer_ce(logits, labels)
    return (answer_ce(logits[~replay], labels[~replay]) + answer_ce(logits[replay], labels[replay])) / 2


class _PluginSteps(TrainerCallback):
    """Runs ``pre_step`` / ``post_step`` around every real optimizer step."""

    def __init__(self, plugins: list[TrainingPlugin]) -> None:
        self.plugins = plugins

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        for p in self.plugins:
            p.pre_step(model)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        with torch.no_grad():
            for p in self.plugins:
                p.post_step(model)


class CLTrainer(Trainer):
    """``transformers.Trainer`` with continual-learning plugins."""

    def __init__(
        self, *args: Any, plugins: list[TrainingPlugin], train_sampler: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.plugins = plugins
        #: a sampler that fixes the row order (GeRe's BI mixing); None = Trainer's shuffling
        self.train_sampler = train_sampler
        self.needs_hidden_states = any(getattr(p, "needs_hidden_states", False) for p in plugins)
        # our compute_loss returns a per-micro-batch mean, so Trainer must divide by the
        # accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.add_callback(_PluginSteps(plugins))
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts = 0

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        side = {k: inputs.pop(k) for k in SIDE_KEYS if k in inputs}
        labels = inputs.pop("labels")
        outputs = model(**inputs, output_hidden_states=self.needs_hidden_states, use_cache=False)
        batch = {**inputs, **side, "labels": labels}
        terms: dict[str, torch.Tensor] = {"ce": task_and_replay_ce(outputs.logits, labels, side.get("sample_kind"))}
        for plugin in self.plugins:
            for key, value in plugin.extra_losses(model, batch, outputs).items():
                name = f"{plugin.name}/{key}"
                if name in terms:
                    raise RuntimeError(f"two plugins returned the loss term {name!r}")
                terms[name] = value
        loss = torch.stack([t.float() for t in terms.values()]).sum()
        for k, v in terms.items():
            self._term_sums[k] += float(v.detach())
        self._term_counts += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # add the mean of every named loss term since the last log line
        if self._term_counts and "loss" in logs:
            for k, v in self._term_sums.items():
                logs[f"loss/{k}"] = round(v / self._term_counts, 6)
            self._term_sums.clear()
            self._term_counts = 0
        super().log(logs, *args, **kwargs)


class Collator:
    """Right-pads ``input_ids``/``labels``/``attention_mask``; passes side keys through."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for key in SIDE_KEYS:
            if key in rows[0]:
                out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return out
