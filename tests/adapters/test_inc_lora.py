"""inc-lora (methods.md §1): a fresh adapter is the identity; summed rank beyond d_in is refused."""

from __future__ import annotations

import pytest
import torch
from method_helpers import make_method, peft_model, random_batches, task_spec

from cladapt.errors import CapacityError


def test_fresh_adapter_leaves_logits_unchanged(tiny_model) -> None:
    batch = random_batches(tiny_model.config.vocab_size, 1)[0]
    with torch.no_grad():
        base = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = peft_model(tiny_model, make_method("inc-lora"))
    with torch.no_grad():
        fresh = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (fresh - base).abs().max() < 1e-6


def test_capacity_is_checked_before_training(tiny_model, history) -> None:
    d_in = tiny_model.config.hidden_size
    path = "model.layers.0.self_attn.q_proj"
    big = {f"{path}.lora_A.weight": torch.randn(d_in - 2, d_in), f"{path}.lora_B.weight": torch.zeros(d_in, d_in - 2)}
    history.add("old", "inc-lora", "sum", big, r=d_in - 2, alpha=1.0, targets=["q_proj"])
    method = make_method("inc-lora", r=4)
    with pytest.raises(CapacityError, match="summed rank"):
        method.prepare(peft_model(tiny_model, method), task_spec([]), history)
