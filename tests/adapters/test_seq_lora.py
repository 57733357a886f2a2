"""seq-lora (methods.md §1): version t starts from exactly version t-1's tensors."""

from __future__ import annotations

import pytest
import torch
from method_helpers import adapter_state, make_method, peft_model, random_batches, task_spec, train_steps

from cladapt.errors import CladaptError


def test_continues_the_latest_version_exactly(tiny_model, history) -> None:
    method = make_method("seq-lora")
    model = peft_model(tiny_model, method)
    batches = random_batches(tiny_model.config.vocab_size, 2)
    method.prepare(model, task_spec(batches), history)  # nothing to continue yet
    train_steps(model, method, batches, 3)
    ref = history.add_finished("first", method, model, method.finalize(model, task_spec(batches)))
    saved = history.adapter_state(ref)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained, so the check can fail

    model = peft_model(model.unload(), make_method("seq-lora"), seed=1)  # a fresh adapter, new init
    method2 = make_method("seq-lora")
    method2.prepare(model, task_spec(batches), history)
    loaded = adapter_state(model)
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    assert method2.parents(history) == [ref]


def test_refuses_to_continue_another_shape(tiny_model, history) -> None:
    method = make_method("seq-lora", r=4)
    model = peft_model(tiny_model, method)
    history.add_finished("first", method, model, method.finalize(model, task_spec([])))
    other = make_method("seq-lora", r=2)
    with pytest.raises(CladaptError, match="shape differs"):
        other.prepare(peft_model(model.unload(), other), task_spec([]), history)
