"""Mixed-adapter batches equal each request alone; capacity splits; a bounded queue; a bounded
concurrent load with zero failures; a promote is served without a restart."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_helpers import add_version, start_server

from cladapt.serve.app import create_app
from cladapt.serve.engine import BASE, Row, Sampling
from cladapt.serve.running import BackgroundServer

PROMPTS = ["the film was great", "the company does business", "a boring story", "science and technology",
           "what is the topic", "yes no question"]
MODELS = ["sentiment", "topics", "tiny", "sum", "topics@1", "sentiment@1"]


def test_mixed_batch_equals_each_alone(served_registry, tiny_base_path) -> None:
    server = start_server(served_registry, tiny_base_path)
    try:
        targets = [server.catalog.resolve(m) for m in MODELS]
        keys = sorted({t.key for t in targets if t.key})
        names = dict(zip(keys, server.cache.ensure(keys), strict=True))
        ids = [server.engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

        def rows(idx: list[int], out: dict[int, str]) -> list[Row]:
            return [Row(ids[i], names[targets[i].key] if targets[i].key else BASE, Sampling(max_tokens=3 + i),
                        on_done=lambda r, i=i: out.__setitem__(i, r.text)) for i in idx]

        together: dict[int, str] = {}
        server.engine.run(rows(list(range(len(PROMPTS))), together))
        alone: dict[int, str] = {}
        for i in range(len(PROMPTS)):
            server.engine.run(rows([i], alone))
        assert together == alone
        assert len({together[0], together[1], together[2], together[3]}) == 4  # the adapters really differ
    finally:
        server.close()


async def _load(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(body: dict) -> httpx.Response:
            async with sem:
                return await client.post(url + "/v1/completions", json=body)
        return await asyncio.gather(*(one(b) for b in bodies))


def test_bounded_concurrent_load_zero_failures_same_answers(served_registry, tiny_base_path) -> None:
    server = start_server(served_registry, tiny_base_path, max_batch_size=8, batch_window_ms=50, cache_capacity=2)
    bodies = [{"model": MODELS[i % len(MODELS)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 5,
               "temperature": 0} for i in range(24)]
    try:
        with BackgroundServer(create_app(server)) as bg:
            solo = {i: httpx.post(bg.url + "/v1/completions", json=bodies[i], timeout=60).json() for i in range(6)}
            responses = asyncio.run(_load(bg.url, bodies, concurrency=8))
            assert [r.status_code for r in responses] == [200] * len(bodies)
            for i, r in enumerate(responses):
                assert r.json()["choices"][0]["text"] == solo[i % 6]["choices"][0]["text"]
            metrics = httpx.get(bg.url + "/metrics").text
        # batches of several rows happened, and 3 adapters through a cache of 2 forced evictions
        sizes = [line for line in metrics.splitlines() if line.startswith('cladapt_batch_size_bucket{le="1.0"}')]
        count = [line for line in metrics.splitlines() if line.startswith("cladapt_batch_size_count")]
        assert float(sizes[0].split()[-1]) < float(count[0].split()[-1])
        assert server.cache.stats.evictions > 0 and len(server.cache.loaded()) <= 2
    finally:
        server.close()


def test_capacity_one_splits_mixed_batches(served_registry, tiny_base_path) -> None:
    server = start_server(served_registry, tiny_base_path, cache_capacity=1, batch_window_ms=100)
    bodies = [{"model": m, "prompt": "the film was great", "max_tokens": 3, "temperature": 0}
              for m in ("sentiment", "topics", "sentiment", "topics")]
    try:
        with BackgroundServer(create_app(server)) as bg:
            responses = asyncio.run(_load(bg.url, bodies, concurrency=4))
        assert [r.status_code for r in responses] == [200] * 4
        assert [r.headers["x-cladapt-adapter"] for r in responses] == ["sentiment@1", "topics@1"] * 2
        assert server.cache.loaded() in (["sentiment@1"], ["topics@1"])
    finally:
        server.close()


def test_full_queue_gets_503_with_retry_after(served_registry, tiny_base_path) -> None:
    server = start_server(served_registry, tiny_base_path, max_queue=1, batch_window_ms=0, retry_after_s=2)
    long = {"model": "tiny", "prompt": "the film", "max_tokens": 200, "temperature": 0}
    try:
        with BackgroundServer(create_app(server)) as bg:
            responses = asyncio.run(_load(bg.url, [long] * 4, concurrency=4))
            codes = sorted(r.status_code for r in responses)
            assert codes[0] == 200 and 503 in codes
            busy = next(r for r in responses if r.status_code == 503)
            assert busy.headers["retry-after"] == "2" and busy.json()["error"]["code"] == 503
            assert httpx.post(bg.url + "/v1/completions", json={**long, "max_tokens": 2}).status_code == 200
            assert 'cladapt_rejected_requests_total' in httpx.get(bg.url + "/metrics").text
    finally:
        server.close()


def test_promote_and_rollback_served_without_restart(served_registry, tiny_base_path, tmp_path) -> None:
    import shutil

    from cladapt.base_model import load
    from cladapt.registry.store import Store

    reg = tmp_path / "reg"
    shutil.copytree(served_registry, reg)
    server = start_server(reg, tiny_base_path, resolve_ttl_s=0)
    body = {"model": "sentiment", "prompt": "the film was great", "max_tokens": 5, "temperature": 0}
    try:
        with BackgroundServer(create_app(server)) as bg:
            first = httpx.post(bg.url + "/v1/completions", json=body, timeout=60)
            assert first.headers["x-cladapt-adapter"] == "sentiment@1"
            store = Store.open(reg)
            add_version(store, load(str(tiny_base_path)), "sentiment", seed=99)  # a new train: sentiment@2 active
            second = httpx.post(bg.url + "/v1/completions", json=body, timeout=60)
            assert second.headers["x-cladapt-adapter"] == "sentiment@2"
            assert second.json()["choices"][0]["text"] != first.json()["choices"][0]["text"]
            listed = {m["id"]: m for m in httpx.get(bg.url + "/v1/models").json()["data"]}
            assert listed["sentiment"]["cladapt"]["ref"] == "sentiment@2"
            store.set_status("sentiment@2", "rejected", "rollback")
            store.set_status("sentiment@1", "active", "rollback")
            third = httpx.post(bg.url + "/v1/completions", json=body, timeout=60)
            assert third.headers["x-cladapt-adapter"] == "sentiment@1"
            assert third.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    finally:
        server.close()


def test_cache_checksums_are_verified_on_load(served_registry, tiny_base_path, tmp_path) -> None:
    import shutil

    from cladapt.errors import IntegrityError

    reg = tmp_path / "reg"
    shutil.copytree(served_registry, reg)
    weights = reg / "tasks" / "qa" / "v1" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    server = start_server(reg, tiny_base_path, batch_window_ms=300)
    try:
        with pytest.raises(IntegrityError):
            server.cache.ensure(["qa@1"])
        assert server.cache.loaded() == []
        bodies = [{"model": m, "prompt": "the film", "max_tokens": 2, "temperature": 0} for m in ("qa", "sentiment")]
        with BackgroundServer(create_app(server)) as bg:
            bad, good = asyncio.run(_load(bg.url, bodies, concurrency=2))
        # one batch: the tampered adapter fails its own request only
        assert bad.status_code == 500 and "sha256" in bad.json()["error"]["message"]
        assert good.status_code == 200 and server.cache.loaded() == ["sentiment@1"]
    finally:
        server.close()


def test_a_client_that_disconnects_stops_its_row(served_registry, tiny_base_path) -> None:
    server = start_server(served_registry, tiny_base_path, batch_window_ms=0)
    body = {"model": "tiny", "prompt": "the film", "max_tokens": 400, "temperature": 0, "stream": True}
    finished: list[tuple[str, int]] = []
    real_finish = server.engine._finish

    def spy(row, text, reason):  # records how each row ended
        finished.append((reason, len(row.generated)))
        return real_finish(row, text, reason)

    server.engine._finish = spy
    try:
        with BackgroundServer(create_app(server)) as bg:
            with httpx.stream("POST", bg.url + "/v1/completions", json=body, timeout=60) as r:
                next(r.iter_lines())  # the first event, then hang up
            deadline = time.monotonic() + 30
            while server.batcher.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.batcher.pending == 0
            assert finished[0][0] == "cancelled" and finished[0][1] < 400
            ok = httpx.post(bg.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
            assert ok.status_code == 200
    finally:
        server.close()


def test_stacked_lora_path_matches_peft_adapter_names(served_registry, tiny_base_path) -> None:
    """The engine's per-row stacked LoRA gives PEFT's own mixed-batch logits and tokens."""
    import torch

    server = start_server(served_registry, tiny_base_path)
    try:
        engine = server.engine
        names = server.cache.ensure(["sentiment@1", "topics@1", "news@1"]) + [BASE]
        ids = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
        stacked = engine._stacked_lora()
        assert stacked is not None and len(stacked.layers) == 4  # q_proj and v_proj of 2 layers
        width = max(map(len, ids))
        x = torch.tensor([[0] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            peft_logits = engine.model(input_ids=x, attention_mask=mask, adapter_names=names).logits
            with stacked.active(engine.model):
                stacked.select(names)
                ours = engine.model(input_ids=x, attention_mask=mask).logits
            plain = engine.model(input_ids=x, attention_mask=mask, adapter_names=[BASE] * 4).logits
        assert torch.allclose(ours, peft_logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours[:3], plain[:3], atol=1e-3)  # the adapters do change the rows

        def decode(use_stacked: bool) -> dict[int, str]:
            engine.use_stacked = use_stacked
            out: dict[int, str] = {}
            engine.run([Row(ids[i], names[i], Sampling(max_tokens=6), on_done=lambda r, i=i: out.__setitem__(i, r.text))
                        for i in range(4)])
            return out

        assert decode(True) == decode(False)
    finally:
        server.engine.use_stacked = True
        server.close()


def test_rows_joining_a_running_batch_equal_each_alone(served_registry, tiny_base_path) -> None:
    """Continuous batching: rows added between steps (prefilled alone, KV caches merged, padding
    trimmed as rows leave) answer exactly what each answers alone."""
    server = start_server(served_registry, tiny_base_path)
    try:
        targets = [server.catalog.resolve(m) for m in MODELS]
        keys = sorted({t.key for t in targets if t.key})
        names = dict(zip(keys, server.cache.ensure(keys), strict=True))
        prompts = [p * (1 + i % 3) for i, p in enumerate(PROMPTS)]  # different lengths: padding on both sides
        ids = [server.engine.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        lengths = [2, 9, 4, 7, 1, 6]  # rows leave at different steps; one joiner finishes on its first token

        def row(i: int, out: dict[int, str]) -> Row:
            return Row(ids[i], names[targets[i].key] if targets[i].key else BASE, Sampling(max_tokens=lengths[i]),
                       on_done=lambda r, i=i: out.__setitem__(i, r.text))

        alone: dict[int, str] = {}
        for i in range(len(PROMPTS)):
            server.engine.run([row(i, alone)])
        joined: dict[int, str] = {}
        schedule = {1: [2, 3], 3: [4], 4: [5]}  # call number -> rows that join then
        calls: list[int] = []

        def join(live: int) -> list[Row]:
            calls.append(live)
            return [row(i, joined) for i in schedule.get(len(calls), [])]

        server.engine.run([row(0, joined), row(1, joined)], join=join)
        assert joined == alone
        assert len(calls) >= 5 and calls[1] == 3  # row 0 left after 2 tokens, rows 2 and 3 had joined
    finally:
        server.close()


@pytest.mark.parametrize(("continuous", "model"), [(True, "topics"), (False, "topics"), (True, "auto")])
def test_a_request_joins_a_running_batch(served_registry, tiny_base_path, continuous: bool, model: str) -> None:
    """A short request sent while a long one streams is answered before the long one ends
    (continuous batching; an ``auto`` one is routed between two steps), or only after it (off)."""
    import threading

    server = start_server(served_registry, tiny_base_path, batch_window_ms=0, continuous_batching=continuous,
                          router="dtkr", router_config={"space": "base", "groups": 1, "keys": 5, "retrieve": 1})
    long = {"model": "sentiment", "prompt": "the film", "max_tokens": 120, "temperature": 0, "stream": True}
    short = {"model": model, "prompt": "the company", "max_tokens": 3, "temperature": 0}
    try:
        with BackgroundServer(create_app(server)) as bg:
            solo = httpx.post(bg.url + "/v1/completions", json=short, timeout=60).json()
            got: dict[str, object] = {}

            def send_short() -> None:
                got["short"] = httpx.post(bg.url + "/v1/completions", json=short, timeout=60).json()
                got["long_done_when_short_answered"] = "long" in got

            with httpx.stream("POST", bg.url + "/v1/completions", json=long, timeout=60) as r:
                lines = r.iter_lines()
                next(lines)  # the long request is decoding
                sender = threading.Thread(target=send_short)
                sender.start()
                for _ in lines:
                    pass
                got["long"] = True
            sender.join(60)
            assert got["short"]["choices"][0]["text"] == solo["choices"][0]["text"]
            assert got["short"]["model"] == solo["model"]  # the same adapter answered (routed: the same route)
            assert got["long_done_when_short_answered"] is (not continuous)
            joined = [ln for ln in httpx.get(bg.url + "/metrics").text.splitlines()
                      if ln.startswith("cladapt_joined_requests_total")]
            assert float(joined[0].split()[-1]) == (1.0 if continuous else 0.0)
    finally:
        server.close()
