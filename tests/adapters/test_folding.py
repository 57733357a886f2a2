"""Folding earlier summed adapters into the frozen base weights (what train_task does) is exact."""

from __future__ import annotations

import torch
from method_helpers import random_batches

from cladapt.adapters.compose import factors, folded, normalize_state


def _perturbed_adapter(model, name: str, seed: int) -> None:
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and name in mod.lora_B:
                w = mod.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)  # B != 0, or every check passes trivially


def test_folded_training_forward_equals_active_adapters(tiny_model) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    batch = random_batches(tiny_model.config.vocab_size, 1)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cfgs = {
        "t1": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        "t2": LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"], lora_dropout=0.0),
        "default": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    }
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, cfgs["t1"], adapter_name="t1")
    for name in ("t2", "default"):
        model.add_adapter(name, cfgs[name])
    for i, name in enumerate(cfgs):
        _perturbed_adapter(model, name, i)

    # reference: earlier adapters active as PEFT adapters next to the trained one
    model.base_model.set_adapter(["t1", "t2", "default"])
    model.train()  # the training forward (dropout is 0, so it is deterministic)
    with torch.no_grad():
        active = model(**inputs).logits

    # train_task's way: earlier adapters folded into the base weights, only "default" active
    earlier = [
        factors(normalize_state(get_peft_model_state_dict(model, adapter_name=n)), cfgs[n].to_dict())
        for n in ("t1", "t2")
    ]
    model.base_model.set_adapter("default")
    with folded(model, earlier), torch.no_grad():
        folded_logits = model(**inputs).logits
    assert torch.allclose(folded_logits, active, rtol=1e-5, atol=1e-5)
    assert (folded_logits - active).abs().max() < 1e-4
    # and the base weights come back bit-exactly
    with torch.no_grad():
        again = model(**inputs).logits
    model.base_model.set_adapter(["default"])
    assert not torch.allclose(again, active, atol=1e-4)  # without folding the earlier adapters are missing
