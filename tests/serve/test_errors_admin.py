"""Bad requests get OpenAI-style 400/404 bodies naming the field; admin needs the bearer token;
the server keeps serving after each."""

from __future__ import annotations

import httpx
import openai
import pytest

OK = {"model": "sentiment", "prompt": "the film was great", "max_tokens": 3, "temperature": 0}


def _post(live, path: str, **kw):
    return httpx.post(live.url + path, timeout=60, **kw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**OK, "max_tokens": "many"}, "max_tokens"),
        ({**OK, "max_tokens": 0}, "max_tokens"),
        ({**OK, "temperature": 3}, "temperature"),
        ({**OK, "prompt": 12}, "prompt"),
        ({k: v for k, v in OK.items() if k != "prompt"}, "prompt"),
        ({**OK, "n": 2}, "n"),
        ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**OK, "max_tokens": 100000}, "max_tokens"),  # over the server's limit
        ({**OK, "max_tokens": 510}, "max_tokens"),  # prompt (8) + completion over the context (512)
        ({**OK, "prompt": "the film " * 400}, "prompt"),  # the prompt alone is over the context
    ],
)
def test_bad_completion_requests_name_the_field(live, body, param) -> None:
    r = _post(live, "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or err["param"].startswith(param), err
    assert err["type"] == "invalid_request_error" and err["message"]
    assert _post(live, "/v1/completions", json=OK).status_code == 200  # still serving


def test_malformed_json_and_wrong_message_shape(live) -> None:
    r = _post(live, "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = _post(live, "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
    assert _post(live, "/v1/completions", json=OK).status_code == 200


def test_unknown_model_is_vllm_404(live) -> None:
    for name in ("nosuchtask", "sentiment@9", "bad name!"):
        r = _post(live, "/v1/completions", json={**OK, "model": name})
        assert r.status_code == 404
        assert r.json() == {"object": "error", "message": f"The model `{name}` does not exist.",
                            "type": "NotFoundError", "param": "model", "code": 404}
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nosuchtask", prompt="hi", max_tokens=2)


def test_admin_needs_the_token(live, tmp_path) -> None:
    body = {"lora_name": "sentiment@1"}
    assert _post(live, "/v1/load_lora_adapter", json=body).status_code == 401
    r = _post(live, "/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert _post(live, "/v1/reload", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_admin_load_pin_unload_and_runtime_folder(live, served_registry) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    server = live.server
    r = _post(live, "/v1/load_lora_adapter", json={"lora_name": "sentiment@1"}, headers=auth)
    assert r.status_code == 200 and "added successfully" in r.text
    assert "sentiment@1" in server.cache.pinned() and "sentiment@1" in server.cache.loaded()
    again = _post(live, "/v1/load_lora_adapter", json={"lora_name": "sentiment@1"}, headers=auth)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    # a folder from outside the registry, served under its own name (what a proxy does with vLLM)
    folder = served_registry / "tasks" / "topics" / "v1" / "adapter"
    r = _post(live, "/v1/load_lora_adapter", json={"lora_name": "ext-topics", "lora_path": str(folder)}, headers=auth)
    assert r.status_code == 200, r.text
    assert "ext-topics" in {m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]}
    a = _post(live, "/v1/completions", json={**OK, "model": "ext-topics", "max_tokens": 6})
    b = _post(live, "/v1/completions", json={**OK, "model": "topics@1", "max_tokens": 6})
    assert a.headers["x-cladapt-adapter"] == "ext-topics"
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]  # same weights, same answer
    bad = _post(live, "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(served_registry)}, headers=auth)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    for name in ("ext-topics", "sentiment@1"):
        r = _post(live, "/v1/unload_lora_adapter", json={"lora_name": name}, headers=auth)
        assert r.status_code == 200 and "removed successfully" in r.text
    assert "sentiment@1" not in server.cache.pinned() and "lora:ext-topics" not in server.cache.loaded()
    assert _post(live, "/v1/completions", json={**OK, "model": "ext-topics"}).status_code == 404
    assert _post(live, "/v1/reload", headers=auth).json()["candidates"] == ["sentiment@1", "topics@1"]


def test_admin_disabled_without_token(served_registry, tiny_base_path) -> None:
    from serve_helpers import start_server

    from cladapt.serve.app import create_app
    from cladapt.serve.running import BackgroundServer

    server = start_server(served_registry, tiny_base_path)
    try:
        with BackgroundServer(create_app(server)) as bg:
            r = httpx.post(bg.url + "/v1/load_lora_adapter", json={"lora_name": "sentiment"},
                           headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and "--admin-token" in r.json()["error"]["message"]
            auto = httpx.post(bg.url + "/v1/completions", json={**OK, "model": "auto"})
            assert auto.status_code == 400 and "--router" in auto.json()["error"]["message"]
            assert auto.json()["error"]["param"] == "model"
    finally:
        server.close()
