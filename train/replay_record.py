"""GeRe's replay record: the base model's replay set and last-layer statistics (methods.md §5).

Recorded once per base model with the *original* base (adapters disabled) and stored in the
registry's shared state ``gere/<base fingerprint>.<tokenizer fingerprint>``; see
:mod:`cladapt.train.replay` for the files, the losses that use them and the choices made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cladapt.errors import CladaptError, DataError, IncompatibleBaseModel, Issue
from cladapt.train.loop import REPLAY_KIND

if TYPE_CHECKING:
    from cladapt.base_model import BaseModelInfo
    from cladapt.config import ReplaySettings
    from cladapt.registry.store import Store

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
        texts = [json.loads(x) for x in (folder / "gere_texts.jsonl").read_text(encoding="utf-8").split("\n") if x.strip()]
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


def recorded(store: Store, *, base: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(key, gere.json) of every replay record in the registry, or of the one of ``base`` (an id or folder)."""
    out = []
    for key in store.shared_keys(GERE_KIND):
        folder = store.read_shared(GERE_KIND, key)
        if folder is not None:
            out.append((key, json.loads((folder / "gere.json").read_text())))
    if base is not None:
        from cladapt.base_model import fingerprint_folder, resolve_path

        resolved = resolve_path(base)
        fp, tok = fingerprint_folder(resolved) if isinstance(resolved, Path) else ("", "")
        out = [(k, m) for k, m in out if k == f"{fp}.{tok}"]
    return out


def recorded_texts(store: Store, key: str, n: int) -> list[str]:
    """The first ``n`` replay texts of record ``key`` (what its statistics were computed on)."""
    folder = store.read_shared(GERE_KIND, key)
    lines = (folder / "gere_texts.jsonl").read_text().splitlines()[:n] if folder else []
    return [json.loads(line)["text"] for line in lines]


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


def disabled_adapters(model: Any) -> Any:
    """``model.disable_adapter()`` for a PeftModel; nothing to disable on a plain model."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def _final_states(
    model: Any, input_ids: torch.Tensor, lengths: torch.Tensor, *, pad: int, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """The base's final-norm hidden states per batch (padding zeroed), with the fp64 sum, sum of
    squares and count over every real token (adapters off, eval mode, the mode restored after)."""
    width = input_ids.shape[1]
    was_training = model.training
    model.eval()
    states: list[torch.Tensor] = []
    total = total_sq = None
    count = 0
    try:
        with disabled_adapters(model):
            for start in range(0, len(input_ids), batch_size):
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
    if total is None or total_sq is None:
        raise CladaptError("no replay text to record", hint="pass texts with at least 2 tokens each")
    return states, total, total_sq, count


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
    from cladapt.text.texts import texts_sha256

    started = time.time()
    ids, kept, dropped = tokenize_texts(tokenizer, texts, n=n, max_tokens=max_tokens, chunk=chunk)
    if not ids:
        raise CladaptError("no usable replay text (each needs at least 2 tokens)", hint="pass other --texts")
    width = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.int32)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    for j, x in enumerate(ids):
        input_ids[j, : len(x)] = torch.tensor(x, dtype=torch.int32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    states, total, total_sq, count = _final_states(model, input_ids, lengths, pad=pad, batch_size=batch_size)
    mu64 = total / count
    sd64 = (total_sq / count - mu64 * mu64).clamp_min(0).sqrt()
    mu, sd = mu64.float(), sd64.float()
    pos, neg = mu + k_sigma * sd, mu - k_sigma * sd
    all_states = torch.cat(states)
    regions = region_codes(all_states, pos, neg)
    regions[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    meta = {
        "format": FORMAT, "base": base.as_dict(), "n": len(ids), "max_tokens": max_tokens, "width": width,
        "hidden_size": int(mu.numel()), "k_sigma": k_sigma, "tokens": count, "dropped_texts": dropped,
        "chunked": chunk, "states": keep_states, "layer": "hidden_states[-1] (after the final norm)",
        "tokenization": {"add_special_tokens": False, "truncation": "right", "padding": "right"},
        "texts_sha256": texts_sha256([t["text"] for t in kept]), "source": source or {"kind": "given"},
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": round(time.time() - started, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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

        if not Path(settings.texts).is_file():
            raise DataError([Issue(settings.texts, "replay texts file not found")])
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
    from cladapt.train.general_texts import replay_corpus

    n = settings.n_replay or DEFAULT_N_REPLAY
    max_tokens = settings.max_tokens or DEFAULT_MAX_TOKENS
    if settings.texts is None:
        logger.info("GeRe: no replay record for %s; self-generating %d general texts (once per base model)", base.id, n)
    texts, source = replay_corpus(model, tokenizer, texts=settings.texts, n=n, max_tokens=max_tokens)
    rec = record(
        model, tokenizer, texts, base=base, n=n, max_tokens=max_tokens, k_sigma=settings.k_sigma,
        batch_size=settings.record_batch_size, keep_states=settings.loss in ("l1", "l2"), source=source,
    )
    save_record(store, rec)
    return rec


def init_record(
    store: Store, base_model: str, *, texts: Path | None = None, self_generate: int | None = None, n: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS, chunk: bool = False, k_sigma: float = 1.0, states: bool = False,
    seed: int = 0, batch_size: int = 8, dtype: str = "float32", force: bool = False,
) -> tuple[ReplayRecord, Path, BaseModelInfo]:
    """``cladapt replay init``: record ``base_model``'s statistics on ``texts`` or ``self_generate`` N texts.

    Returns:
        (the record, where it is stored, the base it belongs to).

    Raises:
        UsageError: neither or both of ``texts`` and ``self_generate``.
        CladaptError: a record for this base exists and ``force`` is not given.
    """
    from cladapt.base_model import load
    from cladapt.errors import UsageError
    from cladapt.train.general_texts import replay_corpus

    if (texts is None) == (self_generate is None):
        raise UsageError("give exactly one of --texts FILE and --self-generate N")
    model, tokenizer, info = load(base_model, dtype=dtype)
    if not force and load_record(store, info) is not None:
        raise CladaptError(f"a replay record for {info.id} already exists", hint="add --force to replace it")
    rows, source = replay_corpus(model, tokenizer, texts=texts, n=self_generate or 0, max_tokens=max_tokens, seed=seed)
    rec = record(model, tokenizer, rows, base=info, n=n or self_generate or DEFAULT_N_REPLAY, max_tokens=max_tokens,
                 k_sigma=k_sigma, batch_size=batch_size, keep_states=states, chunk=chunk, source=source)
    return rec, save_record(store, rec), info
