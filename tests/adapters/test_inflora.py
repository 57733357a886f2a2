"""inflora / fot (methods.md §9): designed A in the free subspace, fot re-projection, capacity, keys."""

from __future__ import annotations

import pytest
import torch
from method_helpers import make_method, peft_model, random_batches, task_spec, train_steps

from cladapt.adapters.inflora import read_bases
from cladapt.adapters.lora_layers import factor_params, input_covariances, lora_layers
from cladapt.errors import CapacityError


def _first_task(tiny_model, history, batches, **cfg):
    method = make_method("inflora", **cfg)
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec(batches), history)
    train_steps(model, method, batches, 3, lr=2e-2)
    side = method.finalize(model, task_spec(batches))
    history.add_finished("first", method, model, side)
    return model.unload(), side


def _bases_by_module(side) -> dict[str, torch.Tensor]:
    by_key = read_bases(side.tensors["bases"])
    return {m: by_key[k] for m, k in side.json["bases"]["module_key"].items()}


def test_modules_sharing_an_input_share_a_key(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 2)
    _, side = _first_task(tiny_model, history, batches, eps_start=0.6)
    keys = side.json["bases"]["module_key"]
    for layer in range(tiny_model.config.num_hidden_layers):
        q, v = (f"model.layers.{layer}.self_attn.{n}_proj" for n in ("q", "v"))
        assert keys[q] == keys[v] == f"model.layers.{layer}.self_attn.q_proj+v_proj"
    assert len(side.json["bases"]["keys"]) == tiny_model.config.num_hidden_layers
    for u in read_bases(side.tensors["bases"]).values():
        assert 0 < u.shape[1] < u.shape[0]
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)


def test_designed_a_lies_in_the_free_subspace(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 3)
    base, side = _first_task(tiny_model, history, batches, eps_start=0.6)
    bases = _bases_by_module(side)
    method = make_method("inflora", eps_start=0.6)
    model = peft_model(base, method, seed=1)
    method.prepare(model, task_spec(random_batches(base.config.vocab_size, 3, seed=5)), history)
    designed = {p: factor_params(layer)[0].detach().clone() for p, layer in lora_layers(model).items()}
    train_steps(model, method, batches, 5, lr=5e-2)
    for path, layer in lora_layers(model).items():
        a, b = factor_params(layer)
        assert not a.requires_grad and torch.equal(a, designed[path])  # frozen: only B trains
        assert b.abs().sum() > 0
        u = bases[path]
        assert (a @ u).norm() / a.norm() < 1e-5
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]) / 3, atol=1e-5)  # orthonormal rows / sqrt(3)
        # a single linear layer: inputs from span(U) see no change from the new adapter
        delta = layer.scaling["default"] * b.detach() @ a
        x = u @ torch.randn(u.shape[1], 8)
        assert (delta @ x).norm() < 1e-5 * delta.norm() * x.norm()


def test_fot_reprojects_after_adamw_steps(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 3)
    base, side = _first_task(tiny_model, history, batches, mode="fot", eps_start=0.6)
    bases = _bases_by_module(side)
    method = make_method("inflora", mode="fot", eps_start=0.6)
    model = peft_model(base, method, seed=1)
    method.prepare(model, task_spec(batches), history)
    start = {p: factor_params(layer)[0].detach().clone() for p, layer in lora_layers(model).items()}
    train_steps(model, method, batches, 10, lr=5e-2)
    for path, layer in lora_layers(model).items():
        a, _ = factor_params(layer)
        assert a.requires_grad and not torch.equal(a, start[path])  # A trains in fot mode
        assert (a.detach() @ bases[path]).norm() < 1e-5
    side2 = method.finalize(model, task_spec(batches))
    assert side2.json["bases"]["t"] == 2 and side2.json["bases"]["eps_t"] == pytest.approx(0.605)
    for m, u in _bases_by_module(side2).items():  # bases are cumulative
        assert (bases[m] - u @ (u.T @ bases[m])).norm() < 1e-4


def test_capacity_error_when_the_bases_fill_the_space(tiny_model, history) -> None:
    d = tiny_model.config.hidden_size
    key = "model.layers.0.self_attn.q_proj+v_proj"
    # stored in "retain" mode: the 2-dimensional complement M, so the protected basis has k = d - 2
    side_t = {f"{key}.M": torch.linalg.qr(torch.randn(d, 2))[0], f"{key}.mode": torch.tensor([1], dtype=torch.int8)}
    module_key = {f"model.layers.0.self_attn.{n}": key for n in ("q_proj", "v_proj")}
    history.add(
        "old",
        "inflora",
        "sum",
        {},
        r=4,
        alpha=8.0,
        targets=["q_proj", "v_proj"],
        tensors={"bases": side_t},
        jsons={"bases": {"module_key": module_key}},
    )
    method = make_method("inflora", r=4)
    with pytest.raises(CapacityError, match="k=62"):
        method.prepare(
            peft_model(tiny_model, method), task_spec(random_batches(tiny_model.config.vocab_size, 1)), history
        )


def test_padding_does_not_change_the_covariance(tiny_model) -> None:
    method = make_method("inflora")
    model = peft_model(tiny_model, method)
    layers = lora_layers(model)
    short = random_batches(tiny_model.config.vocab_size, 1, seq=9, pad=False)[0]
    padded = {k: v.clone() for k, v in short.items()}
    for k, fill in (("input_ids", 2), ("attention_mask", 0)):
        padded[k] = torch.cat([short[k], torch.full((short[k].shape[0], 3), fill)], dim=1)
    a, b = input_covariances(model, layers, [short]), input_covariances(model, layers, [padded])
    assert a.tokens == b.tokens == short["input_ids"].numel()
    for key in a.cov:
        assert torch.allclose(a.cov[key], b.cov[key], rtol=1e-5, atol=1e-6)


def test_preset_adds_b_a_unscaled(tiny_model) -> None:
    """The official InfLoRA forward adds ``B @ A`` with no alpha/r factor: the preset's scaling is 1."""
    from peft import get_peft_model

    from cladapt.adapters import METHODS
    from cladapt.config import load_config

    cfg, _ = load_config(method="inflora")
    assert cfg.lora.r == 8 and cfg.lora.scaling == 1.0
    method = METHODS.get("inflora")(cfg.method, cfg.lora)
    model = get_peft_model(tiny_model, method.lora_config("tiny"))
    layers = lora_layers(model)
    assert layers and {layer.scaling["default"] for layer in layers.values()} == {1.0}
    model.unload()
