"""olora (methods.md §2): penalty values, toy orthogonalisation, frozen history, overlaps sidecar."""

from __future__ import annotations

import math

import torch
from method_helpers import make_method, peft_model, random_batches, task_spec, train_steps

from cladapt.adapters.lora_layers import factor_params, lora_layers


def _history_with_one_task(history, tiny_model, r: int = 4) -> dict[str, torch.Tensor]:
    """An earlier inc-lora task with random A on every q_proj/v_proj."""
    g = torch.Generator().manual_seed(7)
    d = tiny_model.config.hidden_size
    state = {}
    for layer in range(tiny_model.config.num_hidden_layers):
        for name in ("q_proj", "v_proj"):
            path = f"model.layers.{layer}.self_attn.{name}"
            d_out = tiny_model.get_submodule(path).out_features
            state[f"{path}.lora_A.weight"] = torch.randn(r, d, generator=g) / math.sqrt(d)
            state[f"{path}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    history.add("old", "inc-lora", "sum", state, r=r, alpha=8.0, targets=["q_proj", "v_proj"])
    return state


def test_penalties_equal_hand_computation(tiny_model, history) -> None:
    prev = _history_with_one_task(history, tiny_model)
    for kind in ("abs", "sq"):
        method = make_method("olora", lambda1=0.7, lambda2=0.3, penalty=kind)
        model = peft_model(tiny_model, method)
        method.prepare(model, task_spec([]), history)
        terms = method.extra_losses(model, {}, None)
        orth, l2 = 0.0, 0.0
        for path, layer in lora_layers(model).items():
            a, b = (t.detach().double() for t in factor_params(layer))
            o = prev[f"{path}.lora_A.weight"].double() @ a.T
            orth += float(o.abs().sum() if kind == "abs" else o.pow(2).sum())
            l2 += float(a.norm() + b.norm())
        assert math.isclose(float(terms["orth"].detach()), 0.7 * orth, rel_tol=1e-6)
        assert math.isclose(float(terms["l2"].detach()), 0.3 * l2, rel_tol=1e-6)
        tiny_model = model.unload()


def test_penalty_alone_drives_the_overlap_to_zero(tiny_model, history) -> None:
    _history_with_one_task(history, tiny_model)
    method = make_method("olora", lambda1=1.0, penalty="sq")
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec([]), history)
    seen = [max(method.overlaps().values())]

    # only the penalty (no CE), plain SGD on A_t
    opt = torch.optim.SGD([factor_params(layer)[0] for layer in lora_layers(model).values()], lr=0.2)
    for _ in range(200):
        method.extra_losses(model, {}, None)["orth"].backward()
        opt.step()
        opt.zero_grad()
        seen.append(max(method.overlaps().values()))
    assert all(b <= a + 1e-7 for a, b in zip(seen, seen[1:], strict=False)), "overlap must decrease monotonically"
    assert seen[0] > 0.1 and seen[-1] < 1e-3


def test_history_untouched_and_overlaps_recorded(tiny_model, history) -> None:
    _history_with_one_task(history, tiny_model)
    method = make_method("olora")
    model = peft_model(tiny_model, method)
    batches = random_batches(tiny_model.config.vocab_size, 2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    method.prepare(model, task_spec(batches), history)
    train_steps(model, method, batches, 3)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None and torch.equal(p, before[name]), name
    side = method.finalize(model, task_spec(batches))
    info = side.json["olora"]
    assert info["lambda1"] == 0.5 and info["penalty"] == "abs"
    assert set(info["normalized_overlap"]) == set(lora_layers(model))
    assert all(v >= 0 for v in info["normalized_overlap"].values())
