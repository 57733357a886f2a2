"""gslora (methods.md §8): group lasso, bounded forget loss, pruning, a toy forgetting run, prototypes."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import ce, make_method, peft_model, task_spec, train_steps

from cladapt.adapters.gslora import group_of
from cladapt.adapters.lora_layers import factor_params, lora_layers

MLP = ["gate_proj", "up_proj", "down_proj"]


SHORT = {  # short prompts keep the toy runs cheap on 2 CPU cores
    "sentiment": [("great film", "positive"), ("terrible film", "negative")],
    "topics": [("actor plays sports", "sports"), ("company does business", "business")],
}


def _encoded(tokenizer, kind: str, n: int = 16, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    from cladapt.data.rows import Example
    from cladapt.train.chat import encode_all
    from cladapt.train.loop import Collator

    pairs = SHORT[kind]
    examples = [
        Example(
            [{"role": "user", "content": f"{pairs[i % 2][0]} {i}"}, {"role": "assistant", "content": pairs[i % 2][1]}],
            "mem",
            i + 1,
        )
        for i in range(n)
    ]
    enc, _ = encode_all(tokenizer, examples, max_length=128, overlong="truncate")
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "row_index": i} for i, e in enumerate(enc)]
    collate = Collator(tokenizer.pad_token_id)
    return [collate(rows[i : i + batch]) for i in range(0, len(rows), batch)]


def _randomize(model, scales: dict[str, float], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            for t in factor_params(layer):
                t.copy_(torch.randn(t.shape, generator=g) * scales.get(path, 1.0) / math.sqrt(t.numel()))


def _prepared(tiny_model, history, batches, forget, **cfg):
    method = make_method("gslora", targets=MLP, **cfg)
    model = peft_model(tiny_model, method)
    method.prepare(model, task_spec(batches, forget_loader=forget), history)
    return method, model


def test_groups_are_decoder_layers() -> None:
    assert group_of("model.layers.3.mlp.up_proj", "layer") == "model.layers.3"
    assert group_of("model.layers.3.mlp.up_proj", "module") == "model.layers.3.mlp.up_proj"


def test_group_lasso_equals_hand_computation(tiny_loaded, history) -> None:
    model, tok, _ = tiny_loaded
    batches = _encoded(tok, "sentiment", 8)
    method, peft = _prepared(model, history, batches, batches, alpha=0.5)
    _randomize(peft, {})
    hand = 0.0
    for layer_idx in range(model.config.num_hidden_layers):
        sq = sum(
            float(t.detach().double().pow(2).sum())
            for path, layer in lora_layers(peft).items()
            if path.startswith(f"model.layers.{layer_idx}.")
            for t in factor_params(layer)
        )
        hand += math.sqrt(sq + 1e-12)
    assert math.isclose(float(method.group_lasso().detach()), hand, rel_tol=1e-6)
    terms = method.extra_losses(peft, batches[0], None)
    assert math.isclose(float(terms["group"].detach()), 0.5 * hand, rel_tol=1e-6)


def test_bounded_forget_loss_has_no_gradient_beyond_the_bound(tiny_loaded, history) -> None:
    model, tok, _ = tiny_loaded
    batches = _encoded(tok, "topics", 8)
    method, peft = _prepared(model, history, batches, batches, alpha=0.0, bnd=0.5)  # random model: CE >> 0.5
    _randomize(peft, {})
    terms = method.extra_losses(peft, batches[0], None)
    assert float(terms["forget"].detach()) == 0.0
    terms["forget"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in peft.parameters() if p.requires_grad)
    method.bnd = 100.0  # below the bound: the term pushes CE up
    method.extra_losses(peft, batches[0], None)["forget"].backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in peft.parameters() if p.requires_grad)


def test_large_alpha_prunes_groups_to_exact_zero(tiny_loaded, history) -> None:
    model, tok, _ = tiny_loaded
    batches = _encoded(tok, "topics", 8)
    method, peft = _prepared(model, history, batches, batches, alpha=1.0, groups="module", tau_g=0.02)
    paths = list(lora_layers(peft))
    _randomize(peft, {p: s for p, s in zip(paths, [0.1, 0.3, 0.6, 1.0, 2.0, 4.0], strict=False)})
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.01)
    counts = []
    for _ in range(150):  # the group lasso alone: every group shrinks by lr * alpha per step
        with torch.no_grad():
            n = {
                p: math.sqrt(sum(float(t.pow(2).sum()) for t in factor_params(layer)))
                for p, layer in lora_layers(peft).items()
            }
        counts.append(sum(v >= 0.02 * max(n.values()) for v in n.values()))
        method.group_lasso().backward()
        opt.step()
        opt.zero_grad()
    assert counts[0] == 6 and counts[-1] < 6
    assert all(b <= a for a, b in zip(counts, counts[1:], strict=False)), counts
    norms, pruned = method.prune()
    assert len(pruned) >= 6 - counts[-1]
    for path, layer in lora_layers(peft).items():
        zero = all(bool((t == 0).all()) for t in factor_params(layer))
        assert zero == (path in pruned), path


def test_forgetting_a_toy_task_keeps_the_other(tiny_loaded, history) -> None:
    model, tok, _ = tiny_loaded
    retain, forget = _encoded(tok, "sentiment", 8), _encoded(tok, "topics", 8)
    # teach the tiny model both tasks (full fine-tuning: its random lm_head is too weak for a LoRA)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(30):
        sum(
            ce(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            for b in (retain[0], forget[0])
        ).backward()
        opt.step()
        opt.zero_grad()
    model.requires_grad_(False)
    method, peft = _prepared(model, history, retain, forget, beta=1.0, alpha=1e-4, eval_batches=4)
    before = method.before
    assert before["forget"]["seq_acc"] >= 0.9 and before["retain"]["seq_acc"] >= 0.9
    train_steps(peft, method, retain, 20, lr=1e-2)
    side = method.finalize(peft, task_spec(retain, forget_loader=forget))
    info = side.json["gslora"]
    after = info["after"]
    assert after["forget"]["seq_acc"] <= 0.1  # whole answers: chance is ~0
    assert after["forget"]["ce"] > before["forget"]["ce"] + 2.0
    assert after["retain"]["seq_acc"] >= before["retain"]["seq_acc"] - 0.25
    assert info["H"] > 0.5 and info["H_token"] > 0
    assert math.isclose(info["bnd"], math.log(model.config.vocab_size))
    assert set(info["group_norms"]) == {f"model.layers.{i}" for i in range(model.config.num_hidden_layers)}


def test_prototype_losses(tiny_loaded, history) -> None:
    model, tok, _ = tiny_loaded
    retain, forget = _encoded(tok, "sentiment", 8), _encoded(tok, "topics", 8)
    classes = {"forget_classes": ["sports", "business"] * 4, "retain_classes": ["positive", "negative"] * 4}
    method = make_method("gslora", targets=MLP, prototypes=True, w_r=0.5)
    peft = peft_model(model, method)
    method.prepare(peft, task_spec(retain, forget_loader=forget, **classes), history)
    assert method.protos is not None and method.protos.shape == (4, model.config.hidden_size)
    assert method.needs_hidden_states
    _randomize(peft, {})
    out = peft(input_ids=retain[0]["input_ids"], attention_mask=retain[0]["attention_mask"], output_hidden_states=True)
    terms = method.extra_losses(peft, retain[0], out)
    assert {"forget", "group", "proto_f", "proto_r"} <= set(terms)
    assert float(terms["proto_r"].detach()) > 0
    side = method.finalize(peft, task_spec(retain, forget_loader=forget, **classes))
    assert side.tensors["gslora_protos"]["proto"].shape == (4, model.config.hidden_size)
    assert side.json["gslora"]["classes"] == sorted(set(classes["forget_classes"]) | set(classes["retain_classes"]))


@pytest.mark.parametrize("missing", ["forget_loader"])
def test_needs_a_forget_set(tiny_loaded, history, missing: str) -> None:
    from cladapt.errors import CladaptError

    model, tok, _ = tiny_loaded
    method = make_method("gslora", targets=MLP)
    with pytest.raises(CladaptError, match="forget set"):
        method.prepare(peft_model(model, method), task_spec(_encoded(tok, "topics", 4)), history)
