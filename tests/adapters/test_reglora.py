"""reglora (methods.md §4.2): key-element selection, monotone masks, gather == dense, strong penalty."""

from __future__ import annotations

import math

import torch
from method_helpers import ce, make_method, peft_model, random_batches, task_spec, train_steps

from cladapt.adapters.lora_layers import factor_params, lora_layers
from cladapt.adapters.reglora import read_masks


def _first_task(tiny_model, history, batches):
    method = make_method("reglora")
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec(batches), history)
    train_steps(model, method, batches, 5, lr=2e-2)
    side = method.finalize(model, task_spec(batches))
    deltas = {
        p: (factor_params(layer)[1] @ factor_params(layer)[0]).detach().abs()
        for p, layer in lora_layers(model).items()
    }
    history.add_finished("first", method, model, side)
    return model.unload(), side, deltas


def test_key_elements_are_the_top_two_percent(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 2)
    _, side, deltas = _first_task(tiny_model, history, batches)
    masks = read_masks(side.tensors["reglora_mask"])
    assert masks.keys() == deltas.keys()
    for path, mask in masks.items():
        d = deltas[path]
        k = math.floor(0.02 * d.numel())
        assert int(mask.sum()) == k == side.json["reglora"]["modules"][path]["k"]
        assert d[mask].min() >= d[~mask].max()


def test_masks_grow_monotonically_and_gather_equals_dense(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 2)
    base, side1, _ = _first_task(tiny_model, history, batches)
    method = make_method("reglora")
    model = peft_model(base, method, seed=1)
    method.prepare(model, task_spec(batches), history)
    train_steps(model, method, batches, 3, lr=2e-2)

    # the gathered penalty equals the dense one, (1/N_mod) sum_m mean_{Mask_m} |B A|
    dense = []
    for path, layer in lora_layers(model).items():
        a, b = factor_params(layer)
        dense.append((b @ a)[method.union[path]].abs().mean())
    dense_loss = torch.stack(dense).mean()
    assert math.isclose(float(method.reg_loss().detach()), float(dense_loss.detach()), rel_tol=1e-6)

    side2 = method.finalize(model, task_spec(batches))
    m1, m2 = read_masks(side1.tensors["reglora_mask"]), read_masks(side2.tensors["reglora_mask"])
    for path in m1:
        assert bool((m2[path] | m1[path]).eq(m2[path]).all()), f"{path}: Mask(t) must contain Mask(t-1)"
        assert int(m2[path].sum()) > int(m1[path].sum())


def test_large_lambda_keeps_masked_positions_still(tiny_model, history) -> None:
    batches = random_batches(tiny_model.config.vocab_size, 3)
    base, _, _ = _first_task(tiny_model, history, batches)
    method = make_method("reglora", lambda_reg=1e5)
    model = peft_model(base, method, seed=1)
    method.prepare(model, task_spec(batches), history)
    steps = 50
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for s in range(steps):
        batch = batches[s % len(batches)]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = ce(out.logits, batch["labels"]) + sum(method.extra_losses(model, batch, out).values())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for path, layer in lora_layers(model).items():
        a, b = factor_params(layer)
        d = (b @ a).detach().abs()
        mask = method.union[path]
        assert d[~mask].mean() > 0
        assert d[mask].mean() < 1e-3 * d[~mask].mean(), path
