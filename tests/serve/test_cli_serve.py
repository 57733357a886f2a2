"""The README's serving commands on the tiny model: ``cladapt serve`` as a real process, ``export --vllm``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from conftest import cli_run
from fake_vllm import SERVED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROUTER = ["--router", "dtkr", "--router-set", "space=base", "--router-set", "groups=1", "--router-set", "keys=5",
          "--router-set", "retrieve=1"]


def _spawn(*args: str) -> tuple[subprocess.Popen, str]:
    """``cladapt ARGS --port P`` as a process, once its /health answers; returns (process, base URL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cladapt", *args, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "exited")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def test_cladapt_serve_process_answers_curl_and_openai(served_registry, tiny_base_path) -> None:
    proc, url = _spawn("serve", "--registry", str(served_registry), "--base-model", str(tiny_base_path),
                       "--served-model-name", "tiny", *ROUTER, "--admin-token", "t0ken", "--threads", "1")
    try:
        routed = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "the film was terrible"}], "max_tokens": 4})
        assert routed.status_code == 200 and routed.headers["x-cladapt-adapter"] == "sentiment@1"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="topics@1", prompt="hello", max_tokens=4, temperature=0, stream=True)
        assert len(list(stream)) >= 2
        assert {m.id for m in client.models.list().data} >= {"tiny", "sentiment", "topics", "sum", "auto"}
    finally:
        _stop(proc)
    assert not any((Path(served_registry) / ".work" / "serve").iterdir())  # scratch removed at shutdown


def test_export_vllm_writes_folders_modules_and_command(served_registry, tmp_path) -> None:
    out = tmp_path / "vllm"
    bad = cli_run("export", "--vllm", out, "--registry", served_registry, ok=False)
    assert bad.exit_code == 1 and "--base-model-id" in bad.output  # the tiny base is a local folder
    res = cli_run("export", "--vllm", out, "--registry", served_registry, "--base-model-id", SERVED)
    assert f"vllm serve {SERVED} --enable-lora --max-lora-rank 8 --max-loras 4 --lora-modules" in res.output
    modules = json.loads((out / "lora-modules.json").read_text())
    assert [m["name"] for m in modules] == ["news", "qa", "sentiment", "topics"]
    for m in modules:
        cfg = json.loads((Path(m["path"]) / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == SERVED == m["base_model_name"]
        stored = served_registry / "tasks" / m["name"] / "v1" / "adapter" / "adapter_model.safetensors"
        assert (Path(m["path"]) / "adapter_model.safetensors").read_bytes() == stored.read_bytes()
    meta = json.loads((out / "cladapt-export.json").read_text())
    assert {a["ref"] for a in meta["adapters"]} == {"news@1", "qa@1", "sentiment@1", "topics@1"}
    assert (out / "vllm-serve.sh").read_text().splitlines()[-1].startswith(f"vllm serve {SERVED}")
    again = cli_run("export", "--vllm", out, "--registry", served_registry, "--base-model-id", SERVED, ok=False)
    assert again.exit_code == 1 and "not an empty folder" in again.output


def test_cladapt_proxy_process_in_front_of_fake_vllm(served_registry, tmp_path) -> None:
    from fake_vllm import FakeVllm

    from cladapt.serve.running import BackgroundServer

    fake = FakeVllm()
    with BackgroundServer(fake.app()) as upstream:
        proc, url = _spawn("proxy", "--registry", str(served_registry), "--upstream", upstream.url, *ROUTER,
                           "--adapter-dir", str(tmp_path / "adapters"))
        try:
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "auto", "messages": [{"role": "user", "content": "the company does business"}]})
            assert r.status_code == 200 and r.headers["x-cladapt-adapter"] == "topics@1"
            assert r.json()["choices"][0]["message"]["content"] == "answered by topics@1"
            assert list((tmp_path / "adapters").glob("topics-v1-*/adapter_config.json"))  # per served model id
        finally:
            _stop(proc)
    assert [c[1]["lora_name"] for c in fake.calls if c[0] == "load"] == ["topics@1"]
