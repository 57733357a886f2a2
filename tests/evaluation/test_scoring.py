"""Scoring: O-LoRA exact match, format rate, constrained log-likelihood, ROUGE-L, perplexity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import task_rows, write_jsonl

from cladapt.data.rows import Example
from cladapt.evaluation import general_text as P
from cladapt.evaluation import label_scores as L
from cladapt.evaluation import scoring as E
from cladapt.text.template import render


def _ex(prompt: str, answer: str) -> Example:
    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "mem", 1)


def test_normalize_follows_olora() -> None:
    assert E.normalize("  The  Business.\n") == "the business"
    assert E.exact_match("Science or Technology!", "science or technology")
    assert not E.exact_match("a cat", "cat")  # articles are kept
    assert not E.exact_match("positive sentiment", "positive")


def test_label_set_detection_and_loading(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "s.jsonl", task_rows("sentiment", 12))
    es = E.load_eval_set(f, task="sentiment")
    assert es.kind == "classification" and es.labels == ["negative", "positive"]
    assert es.files == [str(f.resolve())] and len(es.sha256) == 64
    sub = E.load_eval_set(f, limit=5, seed=1)
    assert len(sub.examples) == 5 and sub.labels == es.labels  # labels come from every row
    assert sub.task == "s"
    assert not E.is_classification([f"answer number {i}" for i in range(10)])


def test_generate_mode_scores_exact_match_and_format_rate(monkeypatch: pytest.MonkeyPatch, tiny_loaded) -> None:
    model, tok, _ = tiny_loaded
    preds = ["Positive.", "negative", "neutral", "I think positive"]
    monkeypatch.setattr(E, "generate", lambda *a, **k: preds)
    es = E.eval_set_from_examples("s", [_ex(f"q{i}", g) for i, g in enumerate(["positive", "positive", "negative", "positive"])],
                                  labels=["positive", "negative"])
    res = E.evaluate(model, tok, es, mode="generate")
    assert res.exact_match == 25.0 and res.score == 25.0 and res.metric == "exact_match"
    assert res.format_rate == 50.0  # "Positive." and "negative" parse to labels
    assert res.errors[0] == {"gold": "positive", "pred": "negative"}
    assert res.to_json()["n"] == 4


def test_generative_tasks_use_rouge_l(monkeypatch: pytest.MonkeyPatch, tiny_loaded) -> None:
    model, tok, _ = tiny_loaded
    monkeypatch.setattr(E, "generate", lambda *a, **k: ["the cat sat", "hello"])
    es = E.eval_set_from_examples("g", [_ex("a", "the cat sat on"), _ex("b", "goodbye")])
    assert es.labels is None
    res = E.evaluate(model, tok, es)
    assert res.metric == "rougeL" and res.format_rate is None
    assert res.score == pytest.approx(100 * (6 / 7) / 2, abs=1e-6)


def _naive_logprob(model, tok, conv, label) -> float:
    prompt = render(tok, conv)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = L._answer_ids(tok, conv, label)
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(lp[len(p_ids) - 1 + k, t] for k, t in enumerate(a_ids)))


def test_constrained_scores_equal_full_forward_passes(tiny_loaded) -> None:
    model, tok, _ = tiny_loaded
    convs = [[{"role": "user", "content": c}] for c in ("the film was great", "a b", "what is the topic of the plot")]
    labels = ["positive", "science technology", "no"]
    packed = L.label_logprobs(model, tok, convs, labels, batch_size=3)  # left padding + one tree-masked pass
    cached = L.label_logprobs(model, tok, convs, labels, batch_size=3, packed=False)  # KV cache reuse
    for i, conv in enumerate(convs):
        for j, label in enumerate(labels):
            naive = _naive_logprob(model, tok, conv, label)
            assert packed[i][j] == pytest.approx(naive, abs=1e-4)
            assert cached[i][j] == pytest.approx(naive, abs=1e-4)


def test_packed_scoring_works_with_eager_attention(tiny_base_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base_path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_base_path)
    convs = [[{"role": "user", "content": c}] for c in ("hello there", "a much longer question about the plot")]
    packed = L.label_logprobs(model, tok, convs, ["yes", "no way"], packed=True)
    for i, conv in enumerate(convs):
        for j, label in enumerate(["yes", "no way"]):
            assert packed[i][j] == pytest.approx(_naive_logprob(model, tok, conv, label), abs=1e-4)


def test_constrained_mode_picks_the_most_likely_label(monkeypatch: pytest.MonkeyPatch, tiny_loaded) -> None:
    model, tok, _ = tiny_loaded
    monkeypatch.setattr(E, "label_logprobs", lambda *a, **k: [[-1.0, -2.0], [-3.0, -0.5]])
    es = E.eval_set_from_examples("s", [_ex("x", "positive"), _ex("y", "positive")], labels=["positive", "negative"])
    res = E.evaluate(model, tok, es, mode="constrained")
    assert res.constrained == 50.0 and res.score == 50.0 and res.metric == "constrained" and res.exact_match is None


def test_real_generation_runs_batched_with_progress(tiny_loaded, tmp_path: Path) -> None:
    model, tok, _ = tiny_loaded
    es = E.load_eval_set(write_jsonl(tmp_path / "t.jsonl", task_rows("topics", 6)))
    seen: list[int] = []
    res = E.evaluate(model, tok, es, mode="both", max_new_tokens=None, batch_size=4, progress=seen.append)
    assert seen == [4, 2, 4, 2]  # generation pass, then the constrained pass
    assert res.max_new_tokens == E.auto_max_new_tokens(tok, es.labels)
    assert 0.0 <= res.score <= 100.0 and res.constrained is not None and res.format_rate is not None


def test_perplexity_ignores_padding(tiny_loaded, tmp_path: Path) -> None:
    model, tok, _ = tiny_loaded
    f = write_jsonl(tmp_path / "g.jsonl", [{"text": "the film was great and the plot was good"}, {"text": "a village"}])
    texts = P.general_texts([f], 32)
    together = P.perplexity(model, tok, texts, batch_size=2)
    # token-weighted mean NLL: recombine the per-text values by their token counts
    n = [len(tok(t, add_special_tokens=False)["input_ids"]) - 1 for t in texts]
    nll = [torch.log(torch.tensor(P.perplexity(model, tok, [t], batch_size=1))) for t in texts]
    expected = float(torch.exp(sum(x * k for x, k in zip(nll, n, strict=True)) / sum(n)))
    assert together == pytest.approx(expected, rel=1e-4)
    assert together > 1.0
