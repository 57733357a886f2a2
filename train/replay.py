"""GeRe — general-sample replay with the threshold-margin loss (Zhang et al. 2025; methods.md §5).

What it changes during training: a fixed set of general texts is replayed next to every task's
rows, with plain LM cross-entropy on them ("label fitting", averaged 50/50 with the task CE by the
trainer) plus, by default, the TM loss that keeps each last-layer activation in the same band
(below / inside / above ``mu ± k_sigma * sd``) as in the *original* base model.

What it persists, once per base model in the registry's shared state ``gere/<base fp>.<tokenizer fp>``
(methods.md §12): ``gere.json`` (parameters, fingerprints), ``gere_texts.jsonl``,
``gere_ids.safetensors`` (``input_ids`` int32 ``[n, L]``, ``lengths`` int32 ``[n]``),
``gere_stats.safetensors`` (``mu``, ``sd``, ``pos``, ``neg`` float32 ``[d]``, ``count`` int64),
``gere_regions.safetensors`` (int8 ``[n, L, d]`` in {-1, 0, 1}), and ``gere_states.safetensors``
(float16 ``[n, L, d]``) only when ``l1``/``l2`` need raw states. Each task version gets a small
``gere.json`` sidecar saying which record and loss it used.

Recording and storage live in :mod:`cladapt.train.replay_record`; this module holds the losses,
the ``gere`` plugin, BI mixing and the run extension.

Choices where methods.md is silent **[cladapt]**:

* The first ``train --replay general`` on a base without a record records one (``cladapt replay
  init`` does it ahead of time): from ``replay.texts``, else from ``n`` texts the base model writes
  itself (:mod:`cladapt.train.general_texts`). Defaults for the 135M model on CPU: 256 texts of up
  to 256 tokens. A stored record made with other settings (n, max_tokens, k_sigma, texts file) is
  refused with a hint, never silently replaced.
* Recording runs in batches with right padding (GeRe: batch 1, no padding); pads are masked and
  right padding leaves the real tokens' positions unchanged, so states match to ~1e-6.
  Statistics are accumulated in float64 and stored as float32.
* Replay texts are tokenized without special tokens, truncated on the right to ``max_tokens``;
  texts of fewer than 2 tokens are dropped; the first ``n`` remaining texts are used (GeRe's rule).
  The stored ids are what training replays, so tokenization cannot drift from the recording.
* ``dy`` weight: ``CE.detach() / TM.detach()`` with CE the trainer's combined CE; 0 when TM = 0.
* ``kl``'s reference logits come from the model with the *trained* adapter disabled: for methods
  that fold earlier adapters into the frozen weights this is the previous model (LwF-like), not the
  bare base. ``tm``/``l1``/``l2`` always compare with the recorded original base.
* BI mixing (``ratio``): the index order is built in blocks of one *effective* batch
  (``batch_size * grad_accum``), each holding exactly ``k = round(ratio * effective batch)`` replay
  rows at random positions, so every optimizer step sees exactly ``k`` (micro-batches vary). An
  epoch is one pass over the task rows; the replay order is reshuffled whenever it is exhausted.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cladapt.adapters.base import Sidecars, TrainingPlugin
from cladapt.errors import CladaptError
from cladapt.train.distributed import main_first
from cladapt.train.loop import REPLAY_KIND, row_logits, task_and_replay_ce
from cladapt.train.replay_record import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_REPLAY,
    GERE_KIND,
    ReplayRecord,
    disabled_adapters,
    ensure_record,
    load_record,
    record,
    record_key,
    region_codes,
    save_record,
    tokenize_texts,
)

if TYPE_CHECKING:
    from cladapt.config import ReplaySettings
    from cladapt.registry.store import Store
    from cladapt.train.run import RunContext, RunExtension

__all__ = [
    "DEFAULT_MAX_TOKENS", "DEFAULT_N_REPLAY", "GERE_KIND", "BatchInterleaveSampler", "GeRe", "ReplayRecord",
    "dynamic_weight", "ensure_record", "load_record", "masked_kl", "record", "record_key", "region_codes",
    "replay_extension", "save_record", "tm_loss", "tokenize_texts",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- losses


def tm_loss(
    hc: torch.Tensor, regions: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Threshold-margin loss: mean violation over the *violating* elements only (methods.md §5).

    ``hc``: current states ``[b, L, d]``; ``regions``: recorded codes ``[b, L, d]``; ``mask``: ``[b, L]``.
    """
    hc = hc.float()
    viol = torch.where(
        regions == 1,
        torch.relu(pos - hc),
        torch.where(regions == -1, torch.relu(hc - neg), torch.relu(hc - pos) + torch.relu(neg - hc)),
    )
    viol = viol * mask[..., None].to(viol.dtype)
    return viol.sum() / (torch.count_nonzero(viol) + 1e-8)


def dynamic_weight(ce: torch.Tensor, tm: torch.Tensor) -> torch.Tensor:
    """GeRe's ``dy`` weight: ``CE / TM`` on detached values (0 when TM is 0)."""
    tm = tm.detach().float()
    return torch.where(tm > 0, ce.detach().float() / tm.clamp_min(1e-12), torch.zeros_like(tm))


def masked_kl(base_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over non-pad tokens of ``KL(p0_T || pc_T)``, ``p_T = softmax(logits / T)``."""
    logp0 = torch.log_softmax(base_logits.float() / temperature, dim=-1)
    logpc = torch.log_softmax(logits.float() / temperature, dim=-1)
    kl = (logp0.exp() * (logp0 - logpc)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


class GeRe(TrainingPlugin):
    """The replay loss plugin (``tm`` default; ``lf``, ``kl``, ``l1``, ``l2``)."""

    name: ClassVar[str] = "gere"

    def __init__(self, record: ReplayRecord, settings: ReplaySettings, *, usage: dict[str, Any] | None = None) -> None:
        if settings.loss in ("l1", "l2") and record.states is None:
            raise CladaptError(
                f"replay loss {settings.loss!r} needs the base's raw states, which this record does not hold",
                hint="re-record with them: cladapt replay init --states --force (same --texts as before)",
            )
        self.record = record
        self.settings = settings
        self.needs_hidden_states = settings.loss in ("tm", "l1", "l2")
        self.usage = usage or {}
        self._sums: dict[str, float] = {}
        self._steps = 0

    def _replay_view(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        kinds = batch.get("sample_kind")
        if kinds is None:
            return None
        sel = kinds == REPLAY_KIND
        if not bool(sel.any()):
            return None
        idx = batch["row_index"][sel].cpu()
        mask = batch["attention_mask"][sel]
        width = min(mask.shape[1], self.record.input_ids.shape[1])
        if bool(mask[:, width:].any()):
            raise RuntimeError("a replay row is longer than the recorded replay set")
        mask = mask[:, :width]
        expected = self.record.input_ids[idx, :width].to(batch["input_ids"].device).long()
        got = batch["input_ids"][sel][:, :width]
        if not bool(((got == expected) | (mask == 0)).all()):
            raise RuntimeError("replay rows differ from the recorded token ids (tokenization drift)")
        return sel, idx, mask, width

    def extra_losses(self, model: Any, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        loss = self.settings.loss
        view = self._replay_view(batch)
        if view is None:
            return {}
        sel, idx, mask, width = view
        if loss == "lf":  # label fitting only: the trainer's CE already covers the replay rows
            self._observe()
            return {}
        dev = mask.device
        if loss == "kl":
            with torch.no_grad(), disabled_adapters(model):
                base = model(input_ids=batch["input_ids"][sel], attention_mask=batch["attention_mask"][sel]).logits
            # only the replay rows' logits, at every position (the trainer keeps task rows' to their labels)
            kl = masked_kl(base, row_logits(outputs, sel), batch["attention_mask"][sel], self.settings.temperature)
            self._observe(kl=kl)
            return {"kl": self.settings.lambda_kl * kl}
        hc = outputs.hidden_states[-1][sel][:, :width].float()
        if loss in ("l1", "l2"):
            assert self.record.states is not None
            h0 = self.record.states[idx, :width].to(dev).float()
            diff = (hc - h0).abs() if loss == "l1" else (hc - h0) ** 2
            value = (diff * mask[..., None]).sum() / (mask.sum() * hc.shape[-1]).clamp_min(1)
            self._observe(**{loss: value})
            return {loss: self.settings.lambda_f * value}
        regions = self.record.regions[idx, :width].to(dev)
        tm = tm_loss(hc, regions, self.record.pos.to(dev), self.record.neg.to(dev), mask)
        if self.settings.weight == "dy":
            ce = getattr(outputs, "answer_ce", None)  # the trainer's CE term
            if ce is None:
                ce = task_and_replay_ce(outputs.logits, batch["labels"], batch.get("sample_kind"))
            weight = dynamic_weight(ce, tm)
        else:
            weight = torch.tensor(float(self.settings.weight), device=dev)
        with torch.no_grad():  # share of real elements that left their recorded band
            now = region_codes(hc, self.record.pos.to(dev), self.record.neg.to(dev))
            real = mask.bool()[..., None].expand_as(now)
            moved = ((now != regions) & real).sum() / real.sum().clamp_min(1)
        self._observe(tm=tm, violating=moved, weight=weight)
        return {"tm": weight * tm}

    def _observe(self, **values: torch.Tensor) -> None:
        """Running means for the ``gere.json`` sidecar and the manifest's metrics (monitoring only)."""
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._steps += 1

    def finalize(self, model: Any, task: Any) -> Sidecars:
        means = {k: round(v / self._steps, 6) for k, v in self._sums.items()} if self._steps else {}
        usage = {**self.usage, "observed": {"batches_with_replay": self._steps, **means}}
        metrics = {f"gere_{k}_mean": v for k, v in means.items()}
        return Sidecars(json={"gere": usage}, metrics=metrics)


# -------------------------------------------------------------------------------- mixing


class BatchInterleaveSampler(torch.utils.data.Sampler[int]):
    """GeRe's BI mode: exactly ``k`` replay rows in every block of ``block`` consecutive indices."""

    def __init__(self, kinds: Sequence[int], *, k: int, block: int, seed: int) -> None:
        if not 0 < k < block:
            raise CladaptError(
                f"replay rows per batch k={k} must be between 1 and the effective batch {block} minus 1",
                hint="choose --replay-ratio so that round(ratio * batch_size * grad_accum) is in that range",
            )
        self.task = [i for i, kd in enumerate(kinds) if kd != REPLAY_KIND]
        self.replay = [i for i, kd in enumerate(kinds) if kd == REPLAY_KIND]
        if not self.replay or not self.task:
            raise CladaptError("BI replay mixing needs both task rows and replay rows")
        self.k, self.block, self.seed, self.epoch = k, block, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.task) + math.ceil(len(self.task) / (self.block - self.k)) * self.k

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"gere-bi:{self.seed}:{self.epoch}")
        self.epoch += 1  # a different order next time unless the trainer sets the epoch itself
        task = list(self.task)
        rng.shuffle(task)
        queue: list[int] = []
        step = self.block - self.k
        for start in range(0, len(task), step):
            block = task[start : start + step]
            for _ in range(self.k):
                if not queue:
                    queue = list(self.replay)
                    rng.shuffle(queue)
                block.append(queue.pop())
            rng.shuffle(block)
            yield from block


# ----------------------------------------------------------------------------- extension


def replay_extension(settings: ReplaySettings, store: Store) -> RunExtension:
    """The ``train_task`` extension: replay rows, the ``gere`` loss plugin and (BI) the sampler."""

    def apply(ctx: RunContext) -> None:
        # recorded (and stored in the registry) once, by process 0; the other processes then read it
        rec = main_first(lambda: ensure_record(store, ctx.model, ctx.tokenizer, ctx.base, settings))
        ctx.rows_extra.extend(rec.rows())
        t = ctx.config.train
        usage: dict[str, Any] = {
            "record": f"{GERE_KIND}/{record_key(ctx.base)}",
            "texts_sha256": rec.meta["texts_sha256"],
            "n_replay": rec.meta["n"],
            "loss": settings.loss,
            "weight": settings.weight,
            "k_sigma": rec.meta["k_sigma"],
            "mixing": "concat",
        }
        if settings.ratio is not None:
            block = t.batch_size * t.grad_accum
            k = round(settings.ratio * block)
            BatchInterleaveSampler([0, 1], k=k, block=block, seed=0)  # validate k now, before training
            ctx.train_sampler = lambda rows: BatchInterleaveSampler(
                [r.get("sample_kind", 0) for r in rows], k=k, block=block, seed=t.seed
            )
            usage.update(mixing="bi", ratio=settings.ratio, k=k, effective_batch=block)
        ctx.plugins.append(GeRe(rec, settings, usage=usage))

    return apply
