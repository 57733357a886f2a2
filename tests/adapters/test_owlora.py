"""owlora (methods.md §3): intra penalty, exact projections under AdamW, consequence, export."""

from __future__ import annotations

import pytest
import torch
from method_helpers import make_method, peft_model, random_batches, task_spec, train_steps

from cladapt.adapters.linalg import orth
from cladapt.adapters.lora_layers import factor_params, lora_layers
from cladapt.adapters.owlora import WEIGHT_ATTR
from cladapt.errors import CapacityError


def _finished_task(tiny_model, history, batches, seed: int):
    method = make_method("owlora")
    model = peft_model(tiny_model, method, seed=seed)
    method.prepare(model, task_spec(batches, seed=seed), history)
    train_steps(model, method, batches, 5, lr=2e-2)
    ref = history.add_finished(f"task{seed}", method, model, method.finalize(model, task_spec(batches)))
    return model.unload(), ref


def _earlier_bases(history) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per earlier task, per module: (Q_A [d_in, r], Q_B [d_out, r]) recomputed from its exported tensors."""
    out = []
    for e in history.versions():
        state = history.adapter_state(e.ref)
        mods = {k.rsplit(".lora_", 1)[0] for k in state}
        out.append({m: (orth(state[f"{m}.lora_A.weight"].T), orth(state[f"{m}.lora_B.weight"])) for m in mods})
    return out


def _delta(layer) -> torch.Tensor:
    a, b = factor_params(layer)
    w = getattr(layer, WEIGHT_ATTR)["default"] if hasattr(layer, WEIGHT_ATTR) else torch.ones(a.shape[0])
    return layer.scaling["default"] * (b.detach() * w.detach()[None, :]) @ a.detach()


def test_projection_is_exact_under_adamw(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 3)
    base, _ = _finished_task(tiny_model, history, batches, seed=1)
    # an earlier summed task of another method: its bases are derived from its tensors
    d = base.config.hidden_size
    g = torch.Generator().manual_seed(3)
    other = {}
    for m in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        d_out = base.get_submodule(m).out_features
        other[f"{m}.lora_A.weight"] = torch.randn(3, d, generator=g)
        other[f"{m}.lora_B.weight"] = torch.randn(d_out, 3, generator=g)
    history.add("other", "inc-lora", "sum", other, r=3, alpha=3.0, targets=["q_proj", "v_proj"])

    method = make_method("owlora")
    model = peft_model(base, method, seed=2)
    method.prepare(model, task_spec(batches, seed=2), history)
    train_steps(model, method, batches, 10, lr=5e-2)  # AdamW: projecting gradients alone would not be enough
    layers = lora_layers(model)
    bases = _earlier_bases(history)
    assert len(bases) == 2
    for per_task in bases:
        for path, (qa, qb) in per_task.items():
            a, b = factor_params(layers[path])
            assert b.abs().sum() > 0  # B trained, so the checks can fail
            assert (a.detach() @ qa).norm() < 1e-5, path
            assert (qb.T @ b.detach()).norm() < 1e-5, path
            # consequence: the update writes outside earlier output directions and ignores earlier input ones
            delta = _delta(layers[path])
            x = torch.randn(delta.shape[1], 5)
            assert (qb.T @ delta @ x).norm() < 1e-5 * (delta @ x).norm()
            v = qa @ torch.randn(qa.shape[1], 5)
            assert (delta @ v).norm() < 1e-5 * delta.norm() * v.norm()


def test_finalize_folds_w_and_keeps_logits(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 2)
    method = make_method("owlora")
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec(batches), history)
    train_steps(model, method, batches, 4, lr=2e-2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            getattr(layer, WEIGHT_ATTR)["default"].mul_(torch.linspace(0.5, 2.0, method.lora.r))
    model.eval()
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        weighted = model(**inputs).logits
    side = method.finalize(model, task_spec(batches))
    with torch.no_grad():
        plain = model(**inputs).logits
    assert not any(hasattr(layer, WEIGHT_ATTR) for layer in lora_layers(model).values())
    assert all("lora_w" not in k for k in model.state_dict())  # the export is a plain LoRA
    assert torch.allclose(plain, weighted, rtol=1e-5, atol=1e-5)
    qa = side.tensors["owlora_bases"]["model.layers.0.self_attn.q_proj.QA"]
    assert torch.allclose(qa.T @ qa, torch.eye(qa.shape[1]), atol=1e-5)


def test_intra_penalty_zero_for_orthonormal_factors(tiny_model, history) -> None:
    method = make_method("owlora")
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec([]), history)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            a, b = factor_params(layer)
            a.copy_(orth(torch.randn(a.shape[1], a.shape[0])).T)
            b.copy_(orth(torch.randn(b.shape)))
    assert float(method.extra_losses(model, {}, None)["intra"].detach()) < 1e-6


def test_capacity_error_before_training(tiny_model, history) -> None:
    path = "model.layers.0.self_attn.v_proj"
    layer = tiny_model.get_submodule(path)
    r = layer.out_features - 2  # B-side basis almost fills d_out
    state = {
        f"{path}.lora_A.weight": torch.randn(r, layer.in_features),
        f"{path}.lora_B.weight": torch.randn(layer.out_features, r),
    }
    history.add("full", "inc-lora", "sum", state, r=r, alpha=1.0, targets=["v_proj"])
    method = make_method("owlora")
    with pytest.raises(CapacityError, match="k_B"):
        method.prepare(peft_model(tiny_model, method), task_spec([]), history)


def test_intra_penalty_scale_does_not_grow_with_the_module_count(tiny_model, history) -> None:
    """The penalty is a mean over modules: 2 or 8 adapted modules start at the same scale."""
    batches = random_batches(tiny_model.config.vocab_size, 1)
    values = {}
    for targets in (["q_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]):
        method = make_method("owlora", targets=targets)
        model = peft_model(tiny_model, method)
        method.prepare(model, task_spec(batches), history)
        assert len(lora_layers(model)) == 2 * len(targets)
        values[len(targets)] = method.extra_losses(model, batches[0], None)["intra"].detach().item()
        method.finalize(model, task_spec(batches))
        model.unload()
    # every module's A has the same d_in (64) and the same seeded draw law, B = 0: equal per-module terms
    assert values[1] > 0.1 and 0.8 < values[4] / values[1] < 1.25, values
