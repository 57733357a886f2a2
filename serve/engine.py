"""The serving model and its one decoding loop: many requests, each with its own adapter, in one batch.

Why a loop of its own instead of ``model.generate``: a served batch mixes requests that differ in
everything ``generate`` takes once per call (temperature, top_p, seed, stop strings, max_tokens)
and each finished row must be answered at once, with tokens streamed as they come. The loop is
plain KV-cached decoding: left-padded prefill with explicit position ids, then one token per row
and step. PEFT applies each row's adapter through ``adapter_names`` (``__base__`` for none), so
rows with different adapters share every matmul of the base model. Rows that finish leave the batch
(their KV-cache rows are dropped), so a short answer does not pay for a long one.

Continuous batching: between two decoding steps the engine asks its caller for rows that may join
the running batch (``run(rows, join=...)``). A joining row is prefilled on its own, its first token
chosen, and its KV cache merged into the batch's (both left-padded to the longer one), so a request
that arrives while a batch decodes starts at the next step instead of waiting for the whole batch
to finish (the iteration-level scheduling of Orca and vLLM). Leading cache columns that only
padding uses are trimmed when rows leave. Merging needs plain ``DynamicCache`` layers; models with
other cache layers (sliding windows) decode without joins.

How rows get their adapters: PEFT's ``adapter_names`` loops over the distinct adapters of a batch
in every LoRA layer (gather, two small matmuls, scatter per adapter), so 8 adapters cost ~8x the
LoRA work of one. When every loaded adapter is a plain LoRA on ``Linear`` layers, the engine
instead stacks the loaded adapters per layer (scaling folded into B, ranks zero-padded, slot 0 =
no adapter) and adds each row's delta with two batched matmuls over per-row gathered factors (the
BGMV idea of Punica/S-LoRA): the cost no longer depends on how many adapters a batch mixes. Other
adapters (DoRA, biases, embeddings) fall back to ``adapter_names``.

Greedy rows (``temperature == 0``) take the argmax, so a request's tokens do not depend on what
else is in its batch (fp32; a test checks it). A seeded sampled row draws from its own generator,
so its answer does not depend on the batch either.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt.serve.stacked_lora import StackedLora
from cladapt.text.template import render

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's per-row name for "no adapter"


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings (OpenAI's names)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


@dataclass
class Row:
    """One request inside a batch: its tokens, adapter and sampling, and where its output goes.

    ``on_text`` receives text deltas as soon as they are final (never a partial stop string or
    an incomplete UTF-8 character); ``on_done`` receives the result as soon as the row finishes.
    Both are called from the engine thread.
    """

    prompt_ids: list[int]
    adapter: str
    sampling: Sampling
    on_done: Callable[[Result], None]
    on_text: Callable[[str], None] | None = None
    #: polled every step: a row whose client went away stops and frees its batch slot
    cancelled: Callable[[], bool] | None = None
    #: an image request on a vision-language base: the processor's pixel tensors and token-aligned
    #: extras (Qwen2-VL's ``mm_token_type_ids``); decoded through the model's own ``generate``
    vision: dict[str, torch.Tensor] | None = None
    token_extras: dict[str, list[int]] | None = None
    # decoding state
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    generator: torch.Generator | None = None


class Engine:
    """The base model (plus loaded PEFT adapters), its tokenizer and the decoding loop.

    Model mutations (load/delete adapter) and generation take ``lock``, so an adapter is never
    deleted under a running batch.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_context: int | None = None) -> None:
        self.model: Any = model
        self.tokenizer = tokenizer
        self.lock = threading.RLock()
        self.loaded: set[str] = set()
        self._stacked: StackedLora | None = None  # rebuilt when the loaded set changes
        self._hooks: _Hooks | None = None  # the stacked path's switch while a batch decodes
        self.use_stacked = True
        text_config = getattr(model.config, "text_config", None)  # vision-language bases keep it there
        cfg_ctx = (getattr(model.config, "max_position_embeddings", None)
                   or getattr(text_config, "max_position_embeddings", None) or 2048)
        self.max_context = int(max_context or cfg_ctx)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(int(i) for i in ids)
        self.device = next(model.parameters()).device
        # transformers 5.x renames `past_key_values` to `cache`; use whichever this version takes
        import inspect

        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ prompts

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the chat template (the same text eval and training use)."""
        return self.encode_text(render(self.tokenizer, messages))

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, folder: Path, name: str) -> None:
        """Load a PEFT LoRA folder under ``name`` (the first one wraps the base model)."""
        from peft import PeftModel

        with self.lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
            self.model.eval()
            self.loaded.add(name)
            self._stacked = None

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            rest = sorted(self.loaded - {name})
            if rest and name in self.model.active_adapters:
                self.model.set_adapter(rest[0])  # rows name their adapter; this only keeps PEFT consistent
            self.model.delete_adapter(name)
            self.loaded.discard(name)
            self._stacked = None
            if not self.loaded:
                # PEFT keeps pointing its active adapter at the deleted last one; unwrap to the plain
                # model so the next load starts clean
                self.model = self.model.unload()
                self.model.eval()

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def run(self, rows: Sequence[Row], join: Join | None = None) -> None:
        """Decode ``rows`` together until every one has finished (each is answered as it finishes).

        ``join(n_live)``, when given, is called between decoding steps and returns text rows to add
        to the running batch (their adapters must be loaded already: the loaded set cannot change
        under a running batch). It is called outside any adapter hooks, so it may run the model
        itself (routing).
        """
        with self.lock:
            self._prepare(rows)
            for row in rows:
                if row.vision:
                    self._generate_one(row)
            text_rows = [r for r in rows if not r.vision]
            if not text_rows:
                return
            stacked = self._stacked_lora() if self.loaded and self.use_stacked else None
            self._hooks = _Hooks(stacked, self.model) if stacked is not None else None
            try:
                self._decode(text_rows, stacked, join)
            finally:
                if self._hooks is not None:
                    self._hooks.off()
                self._hooks = None

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """The model without a running batch's stacked-adapter hooks (routing a joiner between steps).

        The hooks come back at the batch's next forward.
        """
        with self.lock:
            if self._hooks is not None:
                self._hooks.off()
            yield

    def _prepare(self, rows: Sequence[Row]) -> None:
        unknown = {r.adapter for r in rows} - self.loaded - {BASE}
        if unknown:
            raise RuntimeError(f"adapters not loaded: {sorted(unknown)}")
        for row in rows:
            if row.sampling.temperature > 0:
                seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(device="cpu").manual_seed(seed)

    def _generate_one(self, row: Row) -> None:
        """One image row through the model's own ``generate`` (the path of ``cladapt generate --image``).

        Each family prepares its pixel inputs and positions itself (LLaVA's image features, Qwen2-VL's
        3-D rotary positions from the image grid), which the batched loop's explicit positions
        cannot. Tokens are still chosen by :meth:`_sample` and checked by :meth:`_advance`, so
        sampling, stop strings, streaming and cancellation behave as for text rows.
        """
        from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

        engine, done = self, [False]

        class Choose(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                token = engine._sample([row], scores.float())[0]
                done[0] = done[0] or engine._advance(row, token)
                forced = torch.full_like(scores, float("-inf"))
                forced[:, token] = 0.0
                return forced

        class Finished(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), done[0], dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor([row.prompt_ids], device=self.device)
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs.update({k: torch.tensor([v], device=self.device) for k, v in (row.token_extras or {}).items()})
        inputs.update({k: v.to(self.device) for k, v in (row.vision or {}).items()})
        if self.loaded:
            inputs["adapter_names"] = [row.adapter]
        config = GenerationConfig(max_new_tokens=row.sampling.max_tokens + 1, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=sorted(self.eos_ids) or None)
        self.model.generate(**inputs, generation_config=config, logits_processor=[Choose()],
                            stopping_criteria=[Finished()])
        if not done[0]:  # generate stopped on its own (a length limit of the model)
            self._finish(row, self._text(row), "length")

    def _stacked_lora(self) -> StackedLora | None:
        if self._stacked is None or self._stacked.names != tuple(sorted(self.loaded)):
            self._stacked = StackedLora.build(self.model, sorted(self.loaded))
        return self._stacked if self._stacked.ok else None

    def _forward(self, live: list[Row], input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any,
                 stacked: StackedLora | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if stacked is not None:
            stacked.select([r.adapter for r in live])
        elif self.loaded:  # without any adapter the model is not wrapped and rows are all base
            kwargs["adapter_names"] = [r.adapter for r in live]
        if stacked is not None and self._hooks is not None:
            self._hooks.on()
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
            **{self._cache_kw: cache}, **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, rows: list[Row], stacked: StackedLora | None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill of ``rows``: (cache, mask, last positions [B, 1], next-token logits)."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(rows, ids, mask, pos, cache, stacked)
        return cache, mask, pos[:, -1:], logits

    def _decode(self, live: list[Row], stacked: StackedLora | None, join: Join | None) -> None:
        cache, mask, pos, logits = self._prefill(live, stacked)
        joinable = join is not None and _mergeable(cache)
        while live:
            nxt = self._sample(live, logits)
            keep = [i for i, (row, tok) in enumerate(zip(live, nxt, strict=True)) if not self._advance(row, tok)]
            if not keep:
                return
            if len(keep) < len(live):  # finished rows leave the batch and the KV cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, pos, nxt = mask[index], pos[index], [nxt[i] for i in keep]
                live = [live[i] for i in keep]
                if joinable:
                    mask = _trim_padding(cache, mask)
            if joinable:
                assert join is not None
                new = list(join(len(live)))
                if new:
                    mask, pos = self._admit(new, live, nxt, cache, mask, pos, stacked)
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            pos = pos[:, -1:] + 1
            step = torch.tensor(nxt, device=self.device).unsqueeze(1)
            logits = self._forward(live, step, mask, pos, cache, stacked)

    def _admit(self, new: list[Row], live: list[Row], nxt: list[int], cache: Any, mask: torch.Tensor,
               pos: torch.Tensor, stacked: StackedLora | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``new``, choose their first tokens and merge the survivors into the running batch.

        ``live`` and ``nxt`` are extended in place; returns the batch's new mask and positions.
        """
        if any(r.vision for r in new):
            raise RuntimeError("image rows cannot join a running batch")
        self._prepare(new)
        n_cache, n_mask, n_pos, n_logits = self._prefill(new, stacked)
        first = self._sample(new, n_logits)
        keep = [i for i, (row, tok) in enumerate(zip(new, first, strict=True)) if not self._advance(row, tok)]
        if not keep:
            return mask, pos
        if len(keep) < len(new):
            index = torch.tensor(keep, device=self.device)
            n_cache.batch_select_indices(index)
            n_mask, n_pos = n_mask[index], n_pos[index]
        width = max(mask.shape[1], n_mask.shape[1])
        for layer, n_layer in zip(cache.layers, n_cache.layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, width, -2), _pad_left(n_layer.keys, width, -2)])
            layer.values = torch.cat([_pad_left(layer.values, width, -2), _pad_left(n_layer.values, width, -2)])
        live.extend(new[i] for i in keep)
        nxt.extend(first[i] for i in keep)
        mask = torch.cat([_pad_left(mask, width, -1), _pad_left(n_mask, width, -1)])
        return mask, torch.cat([pos[:, -1:], n_pos])

    def _sample(self, live: list[Row], logits: torch.Tensor) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, row in enumerate(live):
            s = row.sampling
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least the top token)
                drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out[i] = int(torch.multinomial(probs.cpu(), 1, generator=row.generator).item())
        return out

    def _advance(self, row: Row, token: int) -> bool:
        """Append ``token`` to ``row``, stream what became final; True when the row is finished."""
        s = row.sampling
        if row.cancelled is not None and row.cancelled():
            return self._finish(row, self._text(row), "cancelled")
        if token in self.eos_ids:
            return self._finish(row, self._text(row), "stop")
        row.generated.append(token)
        text = self._text(row)
        for stop in s.stop:
            at = text.find(stop)
            if at >= 0:
                return self._finish(row, text[:at], "stop")
        if len(row.generated) >= s.max_tokens:
            return self._finish(row, text, "length")
        if row.on_text is not None:
            safe = len(text)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
                safe = len(text.rstrip("\ufffd"))
            for stop in s.stop:  # hold back a tail that may still become a stop string
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
            if safe > row.emitted:
                row.on_text(text[row.emitted : safe])
                row.emitted = safe
        return False

    def _finish(self, row: Row, text: str, reason: str) -> bool:
        if row.on_text is not None and len(text) > row.emitted:
            row.on_text(text[row.emitted :])
            row.emitted = len(text)
        row.on_done(Result(text, len(row.prompt_ids), len(row.generated), reason))
        return True

    def _text(self, row: Row) -> str:
        return str(self.tokenizer.decode(row.generated, skip_special_tokens=True))


Join = Callable[[int], Sequence[Row]]
"""``join(n_live)``: rows that may join a running batch now (see :meth:`Engine.run`)."""


def _mergeable(cache: Any) -> bool:
    """Whether rows can be added to ``cache``: every layer a plain (growing, unwindowed) DynamicLayer."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` zero-padded at the start of ``dim`` (the sequence axis) to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pads = [0, 0] * (t.dim() - (dim % t.dim()) - 1) + [missing, 0]
    return torch.nn.functional.pad(t, pads)


def _trim_padding(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading cache columns that no remaining row attends to (padding of rows that left)."""
    unused = int((mask.sum(0) == 0).long().cumprod(0).sum())
    if unused == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
    return mask[:, unused:]


class _Hooks:
    """On/off switch of the stacked path for one running batch.

    Entering :meth:`StackedLora.active` costs tens of milliseconds on a real model (PEFT toggles
    every LoRA layer), so the hooks stay on across steps and go off only when something between
    steps needs the plain model (routing a joining request).
    """

    def __init__(self, stacked: StackedLora, model: Any) -> None:
        self._stacked, self._model = stacked, model
        self._ctx: contextlib.AbstractContextManager[None] | None = None

    def on(self) -> None:
        if self._ctx is None:
            self._ctx = self._stacked.active(self._model)
            self._ctx.__enter__()

    def off(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
