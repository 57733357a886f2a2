"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_helpers import sse_events

GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _completion(live, model: str, prompt: str = "the film was great", **kw):
    r = httpx.post(live.url + "/v1/completions", json={"model": model, "prompt": prompt, **GREEDY, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_models_lists_base_adapters_sum_and_auto(client) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny", "sentiment", "topics", "news", "qa", "sum", "auto"} <= set(models)
    assert models["sentiment"].parent == "tiny" and models["sentiment"].root.endswith("adapter")
    assert models["sentiment"].model_extra["cladapt"]["ref"] == "sentiment@1"
    assert models["tiny"].parent is None
    assert models["sum"].model_extra["cladapt"]["refs"] == ["news@1", "qa@1"]


def test_explicit_adapters_answer_and_differ(client, live) -> None:
    texts = {}
    for model in ("sentiment", "topics@1", "tiny", "sum"):
        raw = client.completions.with_raw_response.create(model=model, prompt="the film was great", **GREEDY)
        resp = raw.parse()
        expected = {"sentiment": "sentiment@1", "topics@1": "topics@1", "tiny": "base", "sum": "sum"}[model]
        assert raw.headers["x-cladapt-adapter"] == expected
        assert resp.model_extra["cladapt"]["adapter"] == (None if expected == "base" else expected)
        assert resp.model == model and resp.usage.completion_tokens >= 1
        texts[model] = resp.choices[0].text
    # four different weight sets give four different greedy answers (random B, so they must differ)
    assert len(set(texts.values())) == 4, texts


def test_chat_plain_and_streaming_agree(client) -> None:
    msgs = [{"role": "user", "content": "what is the topic of the following paragraph"}]
    plain = client.chat.completions.create(model="topics", messages=msgs, **GREEDY)
    assert plain.choices[0].message.role == "assistant"
    assert plain.model_extra["cladapt"]["adapter"] == "topics@1"
    stream = client.chat.completions.create(model="topics", messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_completion_stream_is_sse_and_matches(live) -> None:
    body = {"model": "sentiment@1", "prompt": "a good movie", "stream": True, **GREEDY}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-cladapt-adapter"] == "sentiment@1"
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    assert events[0]["cladapt"]["adapter"] == "sentiment@1"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == _completion(live, "sentiment@1", "a good movie").json()["choices"][0]["text"]


def test_auto_routes_each_request_by_content(client) -> None:
    got = {}
    for prompt in ("the film was terrible", "the company does business"):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], **GREEDY)
        extra = raw.parse().model_extra["cladapt"]
        assert raw.headers["x-cladapt-adapter"] == extra["adapter"]
        assert set(extra["route"]["scores"]) == {"sentiment@1", "topics@1"} and extra["router"] == "dtkr"
        got[prompt] = extra["adapter"]
    # the prompts are the tasks' own signature prompts: dtkr must send each to its task
    assert got == {"the film was terrible": "sentiment@1", "the company does business": "topics@1"}


def test_sampling_seed_stop_and_max_tokens(live) -> None:
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    a = _completion(live, "topics", **sampled).json()["choices"][0]["text"]
    b = _completion(live, "topics", **sampled).json()["choices"][0]["text"]
    assert a == b  # same seed, same answer
    full = _completion(live, "tiny", max_tokens=12).json()["choices"][0]
    assert full["finish_reason"] == "length"
    stop = full["text"][3:5]
    cut = _completion(live, "tiny", max_tokens=12, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].find(stop)]
    one = _completion(live, "tiny", max_tokens=1).json()
    assert one["usage"]["completion_tokens"] == 1


def test_metrics_report_requests_tokens_routing_and_cache(live) -> None:
    _completion(live, "sentiment")
    text = httpx.get(live.url + "/metrics").text
    assert 'cladapt_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "cladapt_generation_tokens_total" in text and "cladapt_request_latency_seconds_bucket" in text
    assert 'cladapt_routing_decisions_total{adapter="sentiment@1",how="explicit"}' in text
    assert "cladapt_adapter_cache_misses_total" in text and "cladapt_queue_depth" in text
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
