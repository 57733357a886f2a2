"""``CLTrainer``: the one trainer. It implements the fixed step order of methods.md §0.2.

* ``compute_loss``: forward pass, task cross-entropy on answer tokens, then every plugin's named
  ``extra_losses``; a duplicate term name is an error; every term is logged; the sum is returned.
* per real optimizer step (``transformers.Trainer`` has already accumulated and clipped):
  ``pre_step`` of every plugin, ``optimizer.step()``, ``post_step`` of every plugin. This uses
  the Trainer's own ``on_pre_optimizer_step`` / ``on_optimizer_step`` callback events, so it holds
  under accelerate and DeepSpeed too.

Logits only where the loss is (``train.loss_logits: labelled``, the default). With answer-only
labels a classification row of ~160 tokens has a handful of labelled tokens, yet a plain forward
runs the LM head (``hidden x vocab``: about a fifth of a 135M model's FLOPs) and the cross-entropy
at every position. The trainer instead takes the model's last hidden state
(``output_hidden_states``, with ``logits_to_keep=1`` so the model's own head runs on one position)
and applies the LM head and the cross-entropy only at the positions whose shifted label is not
ignored. That is per row: replay rows, whose every token is labelled, keep every position. Loss
and gradients are those of the full computation up to float rounding. Plugins receive a
:class:`LossOutputs`: the model's hidden states, ``logits`` computed from them on first read (what
a full forward returns), ``row_logits(rows)`` for some rows only (GeRe's ``kl`` reads its replay
rows) and ``answer_ce``, the trainer's cross-entropy.

The first step checks the model: it runs the full forward once and compares the LM head applied
to the last hidden state with the model's own logits at the labelled positions. Models whose
logits are something else (soft-capped or scaled logits: Gemma 2, Cohere, Granite), whose forward
takes no ``logits_to_keep``, and runs whose head is sharded outside the forward (FSDP, DeepSpeed
ZeRO-3) train with full logits; the log says why.

``train.group_by_length`` orders rows with :class:`~cladapt.train.sampler.LengthGroupedSampler`.

Checkpoints, ``--resume``, gradient accumulation, mixed precision and multi-process training come
from ``transformers.Trainer``. Nothing here knows a method by name.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from cladapt.adapters.base import TrainingPlugin
from cladapt.train.chat import IGNORE_INDEX
from cladapt.train.checkpoint_state import SafeCheckpointMixin
from cladapt.train.sampler import LengthGroupedSampler

logger = logging.getLogger(__name__)

#: batch keys the model's forward does not take; plugins may read them in ``extra_losses``
SIDE_KEYS = ("sample_kind", "row_index")
#: ``sample_kind`` value of replay rows (task rows are 0)
REPLAY_KIND = 1


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` moved one position left (the token each position predicts), -100 at the end."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (answer) tokens, computed in fp32.

    The labels are shifted (padded with -100 at the end) rather than the logits sliced: slicing
    ``logits[:, :-1]`` would copy the whole ``[batch, seq, vocab]`` tensor every step.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), shifted_labels(labels).reshape(-1), ignore_index=IGNORE_INDEX
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


def labelled_ce(logits: torch.Tensor, targets: torch.Tensor, replay: torch.Tensor | None) -> torch.Tensor:
    """:func:`task_and_replay_ce` from logits kept at the labelled positions only.

    ``logits`` ``[n, vocab]`` and ``targets`` ``[n]`` are the labelled positions, row by row;
    ``replay`` ``[n]`` marks those of replay rows when the batch mixes task and replay rows
    (None otherwise: one mean over all of them).
    """
    tokens = F.cross_entropy(logits.float(), targets, reduction="none")
    if replay is None:
        return tokens.mean()
    return (tokens[~replay].mean() + tokens[replay].mean()) / 2


def output_head(model: Any) -> tuple[torch.nn.Module | None, str]:
    """The LM head of ``model`` (PEFT-wrapped or not) if its forward can skip the logits, else why not."""
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(net).__name__
    try:
        params = inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "logits_to_keep" not in params:
        return None, f"{name}.forward takes no logits_to_keep"
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        return None, f"{name} has no output embeddings (LM head)"
    return head, ""


def head_mismatch(model_logits: torch.Tensor, head_logits: torch.Tensor) -> str | None:
    """Why the LM head on the last hidden state does not give the model's logits, or None if it does.

    The tolerance is relative to the largest logit: 1e-4 when the head ran in fp32, 2e-2 under
    bf16/fp16 (a different GEMM shape may round differently); soft-capping or scaling the logits
    moves them by far more.
    """
    if model_logits.shape != head_logits.shape:
        return f"logits of shape {tuple(model_logits.shape)} vs {tuple(head_logits.shape)}"
    a, b = model_logits.detach().float(), head_logits.detach().float()
    tol = 1e-4 if head_logits.dtype == torch.float32 else 2e-2
    scale = float(a.abs().max().clamp_min(1.0))
    diff = float((a - b).abs().max())
    if diff > tol * scale:
        return f"its logits are not the LM head of the last hidden state (max difference {diff:.3g})"
    return None


class LossOutputs:
    """What plugins' ``extra_losses`` receive as ``outputs`` (see the module docstring).

    ``hidden_states`` and every other field are the model's. ``logits`` is ``[batch, seq, vocab]``
    as a full forward returns it: the model's own, or the LM head applied to the last hidden
    state on first read (then cached). ``row_logits(rows)`` gives ``logits[rows]`` computing only
    those rows. ``answer_ce`` is the trainer's task/replay cross-entropy term.
    """

    def __init__(
        self, raw: Any, answer_ce: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self._raw = raw
        self._head = head
        self._logits: torch.Tensor | None = raw.logits if head is None else None
        self.answer_ce = answer_ce

    @property
    def hidden_states(self) -> Any:
        return self._raw.hidden_states

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            assert self._head is not None
            self._logits = self._head(self._raw.hidden_states[-1])
        return self._logits

    def row_logits(self, rows: torch.Tensor) -> torch.Tensor:
        if self._logits is not None:
            return self._logits[rows.to(self._logits.device)]
        assert self._head is not None
        hidden = self._raw.hidden_states[-1]
        return self._head(hidden[rows.to(hidden.device)])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._raw, name)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def row_logits(outputs: Any, rows: torch.Tensor) -> torch.Tensor:
    """``outputs.logits[rows]``, computing only those rows when ``outputs`` is a :class:`LossOutputs`."""
    return outputs.row_logits(rows) if isinstance(outputs, LossOutputs) else outputs.logits[rows]


def _row_lengths(dataset: Any) -> list[int]:
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [row["input_ids"] for row in dataset]
    return [len(ids) for ids in column]


def _has_replay_rows(dataset: Any) -> bool:
    if hasattr(dataset, "column_names"):
        return "sample_kind" in dataset.column_names and REPLAY_KIND in set(dataset["sample_kind"])
    return any(row.get("sample_kind") == REPLAY_KIND for row in dataset)


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


class CLTrainer(SafeCheckpointMixin, Trainer):
    """``transformers.Trainer`` with continual-learning plugins.

    Args:
        train_sampler: a sampler that fixes the row order (GeRe's BI mixing); None = Trainer's
            shuffling, or length grouping with ``group_by_length``.
        loss_logits: ``labelled`` (LM head and CE at labelled positions only) or ``full``.
        group_by_length / length_window: order rows with :class:`LengthGroupedSampler` (not
            applied with replay rows, nor with ``train_sampler``).
    """

    def __init__(
        self,
        *args: Any,
        plugins: list[TrainingPlugin],
        train_sampler: Any = None,
        loss_logits: Literal["labelled", "full"] = "labelled",
        group_by_length: bool = False,
        length_window: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.plugins = plugins
        self.train_sampler = train_sampler
        self.loss_logits = loss_logits
        self.group_by_length = group_by_length
        self.length_window = length_window
        self.needs_hidden_states = any(getattr(p, "needs_hidden_states", False) for p in plugins)
        # our compute_loss returns a per-micro-batch mean, so Trainer must divide by the
        # accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.add_callback(_PluginSteps(plugins))
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts = 0
        self._head: torch.nn.Module | None = None
        self._head_decided = False
        self._head_checked = False

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.train_sampler is not None:
            return self.train_sampler
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and dataset is not None:
            if _has_replay_rows(dataset):
                logger.info("group_by_length is not applied: replay rows are mixed in (GeRe weights them per batch)")
            else:
                return LengthGroupedSampler(
                    _row_lengths(dataset), batch_size=self._train_batch_size, window=self.length_window,
                    seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                )
        return super()._get_train_sampler(train_dataset)

    # -- loss ----------------------------------------------------------------------------------

    def _labelled_head(self, model: Any) -> torch.nn.Module | None:
        """The LM head for the labelled-position path, or None (full logits); decided once."""
        if not self._head_decided:
            self._head_decided = True
            if self.loss_logits == "full":
                return None
            why = ""
            if self.is_fsdp_enabled:
                why = "FSDP shards the LM head outside the forward"
            elif self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
                why = "DeepSpeed ZeRO-3 partitions the LM head outside the forward"
            else:
                self._head, why = output_head(self.accelerator.unwrap_model(model))
            if self._head is None:
                logger.warning("train.loss_logits=labelled: %s; training with full logits", why)
        return self._head

    def _apply_head(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # under the same autocast as the model's forward (accelerate wraps only that forward)
        with self.accelerator.autocast():
            return head(hidden)

    def _labelled_forward(
        self, model: Any, head: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, kinds: Any
    ) -> tuple[Any, torch.Tensor, LossOutputs]:
        checking = not self._head_checked
        raw = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=0 if checking else 1)
        if raw.hidden_states is None:
            raise RuntimeError(f"{type(model).__name__} returned no hidden states; set train.loss_logits=full")
        hidden = raw.hidden_states[-1]
        targets = shifted_labels(labels).to(hidden.device)  # a model split over devices ends elsewhere
        keep = targets != IGNORE_INDEX
        logits = self._apply_head(head, hidden[keep])
        if checking and bool(keep.any()):
            self._head_checked = True
            why = head_mismatch(raw.logits[keep.to(raw.logits.device)].to(logits.device), logits)
            if why is not None:
                logger.warning("train.loss_logits=labelled: %s; training with full logits", why)
                self._head = None
                ce = task_and_replay_ce(raw.logits, labels, kinds)
                return raw, ce, LossOutputs(raw, ce)
        replay = None
        if kinds is not None:
            rows = (kinds == REPLAY_KIND).to(keep.device)
            if bool(rows.any()) and not bool(rows.all()):
                replay = rows[:, None].expand_as(keep)[keep].to(logits.device)
        ce = labelled_ce(logits, targets[keep].to(logits.device), replay)
        if checking:  # this step computed the full logits anyway: plugins read them as they are
            return raw, ce, LossOutputs(raw, ce)
        return raw, ce, LossOutputs(raw, ce, head=lambda h: self._apply_head(head, h))

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        side = {k: inputs.pop(k) for k in SIDE_KEYS if k in inputs}
        labels = inputs.pop("labels")
        kinds = side.get("sample_kind")
        # evaluation (return_outputs) hands the logits back to the Trainer: full ones
        head = None if return_outputs else self._labelled_head(model)
        if head is not None:
            raw, ce, outputs = self._labelled_forward(model, head, inputs, labels, kinds)
        else:
            raw = model(**inputs, output_hidden_states=self.needs_hidden_states, use_cache=False)
            ce = task_and_replay_ce(raw.logits, labels, kinds)
            outputs = LossOutputs(raw, ce)
        batch = {**inputs, **side, "labels": labels}
        terms: dict[str, torch.Tensor] = {"ce": ce}
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
        return (loss, raw) if return_outputs else loss

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
