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

Choices where methods.md is silent **[cladapt]**:

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

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from cladapt.adapters.base import Sidecars, TrainingPlugin
from cladapt.errors import CladaptError, IncompatibleBaseModel
from cladapt.train.loop import REPLAY_KIND, task_and_replay_ce

if TYPE_CHECKING:
    from cladapt.base_model import BaseModelInfo
    from cladapt.config import ReplaySettings
    from cladapt.registry.store import Store
    from cladapt.train.run import RunContext, RunExtension

logger = logging.getLogger(__name__)

GERE_KIND = "gere"
DEFAULT_N_REPLAY = 256
DEFAULT_MAX_TOKENS = 256
FORMAT = 1


def record_key(base: BaseModelInfo) -> str:
    """The shared-state key of ``base``'s record: model and tokenizer fingerprints."""
    return f"{base.fingerprint}.{base.tokenizer_fingerprint}"


@dataclass
class ReplayRecord:
    """The base model's replay set and its last-layer activation statistics."""

    meta: dict[str, Any]
    texts: list[dict[str, str]]
    input_ids: torch.Tensor  # int32 [n, L], right-padded with 0
    lengths: torch.Tensor  # int32 [n]
    mu: torch.Tensor  # float32 [d]
    sd: torch.Tensor
    pos: torch.Tensor  # mu + k_sigma * sd
    neg: torch.Tensor  # mu - k_sigma * sd
    count: torch.Tensor  # int64 scalar: tokens the statistics are over
    regions: torch.Tensor  # int8 [n, L, d]
    states: torch.Tensor | None = None  # float16 [n, L, d]

    def check_base(self, base: BaseModelInfo) -> None:
        """Refuse a record made with another base model or tokenizer (methods.md §5 pitfall)."""
        rec = self.meta.get("base", {})
        for field, mine in (("fingerprint", base.fingerprint), ("tokenizer_fingerprint", base.tokenizer_fingerprint)):
            if rec.get(field) != mine:
                raise IncompatibleBaseModel(
                    f"the GeRe replay record was made with base model {rec.get('id')!r} ({field} {rec.get(field)}), "
                    f"but the loaded base is {base.id!r} ({field} {mine})",
                    hint="record statistics for this base: cladapt replay init --base-model "
                    f"{base.id} (replay records are only valid for the exact weights and tokenizer)",
                )

    def rows(self) -> list[dict[str, Any]]:
        """Training rows: the recorded ids, labels = ids (label fitting), ``sample_kind`` = replay."""
        out = []
        for j, n in enumerate(self.lengths.tolist()):
            ids = self.input_ids[j, :n].tolist()
            out.append({"input_ids": ids, "labels": list(ids), "sample_kind": REPLAY_KIND, "row_index": j})
        return out

    def save(self, folder: Path) -> dict[str, Path]:
        """Write the record's files into ``folder``; returns name -> path for ``Store.write_shared``."""
        from safetensors.torch import save_file

        files = {
            "gere.json": folder / "gere.json",
            "gere_texts.jsonl": folder / "gere_texts.jsonl",
            "gere_ids.safetensors": folder / "gere_ids.safetensors",
            "gere_stats.safetensors": folder / "gere_stats.safetensors",
            "gere_regions.safetensors": folder / "gere_regions.safetensors",
        }
        files["gere.json"].write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        files["gere_texts.jsonl"].write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self.texts))
        save_file({"input_ids": self.input_ids, "lengths": self.lengths}, str(files["gere_ids.safetensors"]))
        stats = {"mu": self.mu, "sd": self.sd, "pos": self.pos, "neg": self.neg, "count": self.count}
        save_file(stats, str(files["gere_stats.safetensors"]))
        save_file({"regions": self.regions}, str(files["gere_regions.safetensors"]))
        if self.states is not None:
            files["gere_states.safetensors"] = folder / "gere_states.safetensors"
            save_file({"states": self.states}, str(files["gere_states.safetensors"]))
        return files

    @classmethod
    def load(cls, folder: Path) -> ReplayRecord:
        from safetensors.torch import load_file

        ids = load_file(str(folder / "gere_ids.safetensors"))
        stats = load_file(str(folder / "gere_stats.safetensors"))
        texts = [json.loads(x) for x in (folder / "gere_texts.jsonl").read_text().splitlines() if x.strip()]
        states_path = folder / "gere_states.safetensors"
        return cls(
            meta=json.loads((folder / "gere.json").read_text()),
            texts=texts,
            input_ids=ids["input_ids"],
            lengths=ids["lengths"],
            regions=load_file(str(folder / "gere_regions.safetensors"))["regions"],
            states=load_file(str(states_path))["states"] if states_path.is_file() else None,
            **{k: stats[k] for k in ("mu", "sd", "pos", "neg", "count")},
        )


def save_record(store: Store, record: ReplayRecord) -> Path:
    """Write ``record`` atomically into the registry (replacing an older one for the same base)."""
    base = record.meta["base"]
    key = f"{base['fingerprint']}.{base['tokenizer_fingerprint']}"
    with tempfile.TemporaryDirectory(prefix="gere-") as tmp:
        return store.write_shared(GERE_KIND, key, record.save(Path(tmp)))


def load_record(store: Store, base: BaseModelInfo) -> ReplayRecord | None:
    """``base``'s verified record, or None if none was recorded.

    Raises:
        IntegrityError: a stored file does not match its sha256.
        IncompatibleBaseModel: the stored record names another base or tokenizer.
    """
    folder = store.read_shared(GERE_KIND, record_key(base))
    if folder is None:
        return None
    record = ReplayRecord.load(folder)
    record.check_base(base)
    return record


# ------------------------------------------------------------------------------ recording


def tokenize_texts(
    tokenizer: Any, texts: Sequence[dict[str, str]], *, n: int, max_tokens: int, chunk: bool = False
) -> tuple[list[list[int]], list[dict[str, str]], int]:
    """(ids, the texts they came from, texts dropped) — no special tokens, right truncation.

    ``chunk`` splits a long text into consecutive ``max_tokens`` pieces instead of truncating.
    """
    ids: list[list[int]] = []
    kept: list[dict[str, str]] = []
    dropped = 0
    for t in texts:
        if len(ids) >= n:
            break
        full = tokenizer(t["text"], add_special_tokens=False)["input_ids"]
        pieces = [full[i : i + max_tokens] for i in range(0, len(full), max_tokens)] if chunk else [full[:max_tokens]]
        for k, piece in enumerate(pieces):
            if len(piece) < 2 or len(ids) >= n:
                dropped += len(piece) < 2
                continue
            ids.append(piece)
            text = tokenizer.decode(piece) if (chunk or len(full) > max_tokens) else t["text"]
            kept.append({**t, "text": text, **({"chunk": str(k)} if chunk else {})})
    return ids, kept, dropped


def region_codes(h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """+1 where ``h >= pos``, -1 where ``h <= neg``, else 0 (int8)."""
    one = torch.ones((), dtype=torch.int8)
    return torch.where(h >= pos, one, torch.where(h <= neg, -one, torch.zeros((), dtype=torch.int8)))


def _disabled_adapters(model: Any) -> Any:
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def record(
    model: Any,
    tokenizer: Any,
    texts: Sequence[dict[str, str]],
    *,
    base: BaseModelInfo,
    n: int = DEFAULT_N_REPLAY,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    k_sigma: float = 1.0,
    batch_size: int = 8,
    keep_states: bool = False,
    chunk: bool = False,
    source: dict[str, Any] | None = None,
) -> ReplayRecord:
    """Record the original base's last hidden states (after the final norm) on the replay set.

    Statistics are population statistics over every non-pad token of every text (methods.md §5).
    """
    from cladapt.train.general_texts import texts_sha256

    started = time.time()
    ids, kept, dropped = tokenize_texts(tokenizer, texts, n=n, max_tokens=max_tokens, chunk=chunk)
    if not ids:
        raise CladaptError("no usable replay text (each needs at least 2 tokens)", hint="pass other --texts")
    width = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.int32)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    for j, x in enumerate(ids):
        input_ids[j, : len(x)] = torch.tensor(x, dtype=torch.int32)
    was_training = model.training
    model.eval()
    states: list[torch.Tensor] = []
    total = total_sq = None
    count = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with _disabled_adapters(model):
            for start in range(0, len(ids), batch_size):
                batch_ids = input_ids[start : start + batch_size].long()
                mask = (torch.arange(width)[None, :] < lengths[start : start + batch_size, None]).long()
                batch_ids = torch.where(mask.bool(), batch_ids, torch.full_like(batch_ids, pad))
                out = model(
                    input_ids=batch_ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    output_hidden_states=True,
                    use_cache=False,
                )
                h = out.hidden_states[-1].float().cpu()  # [b, width, d]: the final-norm output
                real = h[mask.bool()].double()  # [tokens, d]
                total = real.sum(0) if total is None else total + real.sum(0)
                total_sq = (real * real).sum(0) if total_sq is None else total_sq + (real * real).sum(0)
                count += real.shape[0]
                states.append(h * mask[..., None])
    finally:
        model.train(was_training)
    assert total is not None and total_sq is not None
    mu64 = total / count
    sd64 = (total_sq / count - mu64 * mu64).clamp_min(0).sqrt()
    mu, sd = mu64.float(), sd64.float()
    pos, neg = mu + k_sigma * sd, mu - k_sigma * sd
    all_states = torch.cat(states)
    regions = region_codes(all_states, pos, neg)
    regions[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    meta = {
        "format": FORMAT,
        "base": base.as_dict(),
        "n": len(ids),
        "max_tokens": max_tokens,
        "width": width,
        "hidden_size": int(mu.numel()),
        "k_sigma": k_sigma,
        "tokens": count,
        "dropped_texts": dropped,
        "chunked": chunk,
        "states": keep_states,
        "layer": "hidden_states[-1] (after the final norm)",
        "tokenization": {"add_special_tokens": False, "truncation": "right", "padding": "right"},
        "texts_sha256": texts_sha256([t["text"] for t in kept]),
        "source": source or {"kind": "given"},
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": round(time.time() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    logger.info("GeRe: recorded %d texts, %d tokens, d=%d in %.1fs", len(ids), count, mu.numel(), meta["seconds"])
    return ReplayRecord(
        meta=meta,
        texts=kept,
        input_ids=input_ids,
        lengths=lengths,
        mu=mu,
        sd=sd,
        pos=pos,
        neg=neg,
        count=torch.tensor(count, dtype=torch.int64),
        regions=regions,
        states=all_states.half() if keep_states else None,
    )


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
            with torch.no_grad(), _disabled_adapters(model):
                base = model(input_ids=batch["input_ids"][sel], attention_mask=batch["attention_mask"][sel]).logits
            kl = masked_kl(base, outputs.logits[sel], batch["attention_mask"][sel], self.settings.temperature)
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


def _check_settings(record: ReplayRecord, settings: ReplaySettings) -> None:
    meta, problems = record.meta, []
    if settings.n_replay is not None and settings.n_replay != meta["n"]:
        problems.append(f"n_replay {settings.n_replay} (recorded: {meta['n']})")
    if settings.max_tokens is not None and settings.max_tokens != meta["max_tokens"]:
        problems.append(f"max_tokens {settings.max_tokens} (recorded: {meta['max_tokens']})")
    if settings.k_sigma != meta["k_sigma"]:
        problems.append(f"k_sigma {settings.k_sigma} (recorded: {meta['k_sigma']})")
    if settings.texts is not None:
        from cladapt.registry.fsio import sha256_file

        if meta["source"].get("file_sha256") != sha256_file(Path(settings.texts))[0]:
            problems.append(f"texts {settings.texts} (recorded: {meta['source'].get('path', meta['source']['kind'])})")
    if problems:
        raise CladaptError(
            "the replay record stored for this base model was made with other settings: " + "; ".join(problems),
            hint="re-record: cladapt replay init --force with the settings you want, or drop the differing replay.* keys",
        )


def ensure_record(store: Store, model: Any, tokenizer: Any, base: BaseModelInfo, settings: ReplaySettings) -> ReplayRecord:
    """The stored record for ``base``, recording one (and storing it) if there is none yet."""
    existing = load_record(store, base)
    if existing is not None:
        _check_settings(existing, settings)
        return existing
    from cladapt.train import general_texts

    n = settings.n_replay or DEFAULT_N_REPLAY
    max_tokens = settings.max_tokens or DEFAULT_MAX_TOKENS
    if settings.texts is not None:
        from cladapt.registry.fsio import sha256_file

        texts = general_texts.load_texts(settings.texts)
        source = {"kind": "file", "path": str(Path(settings.texts).resolve()), "file_sha256": sha256_file(Path(settings.texts))[0]}
    else:
        logger.info("GeRe: no replay record for %s; self-generating %d general texts (once per base model)", base.id, n)
        texts = general_texts.self_generate(model, tokenizer, n, max_new_tokens=max_tokens)
        source = {"kind": "self-generated", "generation": general_texts.generation_settings(n, 0, max_tokens, 16)}
    rec = record(
        model, tokenizer, texts, base=base, n=n, max_tokens=max_tokens, k_sigma=settings.k_sigma,
        batch_size=settings.record_batch_size, keep_states=settings.loss in ("l1", "l2"), source=source,
    )
    save_record(store, rec)
    return rec


def replay_extension(settings: ReplaySettings, store: Store) -> RunExtension:
    """The ``train_task`` extension: replay rows, the ``gere`` loss plugin and (BI) the sampler."""

    def apply(ctx: RunContext) -> None:
        rec = ensure_record(store, ctx.model, ctx.tokenizer, ctx.base, settings)
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
