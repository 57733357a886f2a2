"""A small fake of vLLM's documented OpenAI + LoRA contract, for the proxy tests (loopback only).

Implements what the proxy relies on (serving-and-scale.md §2): ``/v1/models`` with the base and
each loaded adapter (``parent``/``root``); runtime ``load_lora_adapter``/``unload_lora_adapter``
(400 when already loaded, and a resolver-like refusal of an adapter whose
``base_model_name_or_path`` is not the served model); completions and chat, streamed as SSE; the
404 body for an unknown model. Answers say which model answered so tests can check the routing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

SERVED = "fake-org/base-model"


class FakeVllm:
    def __init__(self, served: str = SERVED) -> None:
        self.served = served
        self.loras: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def restart(self) -> None:
        """Forget every runtime-loaded adapter, as a restarted vLLM does."""
        self.loras.clear()

    def app(self) -> FastAPI:
        app = FastAPI()

        def not_found(model: str) -> Response:
            return JSONResponse({"object": "error", "message": f"The model `{model}` does not exist.",
                                 "type": "NotFoundError", "param": None, "code": 404}, status_code=404)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            data = [{"id": self.served, "object": "model", "root": self.served, "parent": None}]
            data += [{"id": n, "object": "model", "root": p, "parent": self.served} for n, p in self.loras.items()]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("load", body))
            name, path = body["lora_name"], Path(body["lora_path"])
            if name in self.loras:
                return JSONResponse({"object": "error", "message": f"The lora adapter '{name}' has already been loaded.",
                                     "type": "InvalidUserInput", "code": 400}, status_code=400)
            cfg_file = path / "adapter_config.json"
            if not cfg_file.is_file() or not (path / "adapter_model.safetensors").is_file():
                return JSONResponse({"object": "error", "message": f"no adapter at {path}", "code": 400}, status_code=400)
            base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
            if base != self.served:
                return JSONResponse({"object": "error", "message": f"adapter for {base!r}, serving {self.served!r}",
                                     "code": 400}, status_code=400)
            self.loras[name] = str(path)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = await request.json()
            if self.loras.pop(body["lora_name"], None) is None:
                return not_found(body["lora_name"])
            return PlainTextResponse("Success")

        async def complete(request: Request, chat: bool) -> Response:
            body = await request.json()
            self.calls.append(("chat" if chat else "completion", body))
            model = body["model"]
            if model != self.served and model not in self.loras:
                return not_found(model)
            words = ["answered", " by", f" {model}"]
            if body.get("stream"):
                def events() -> Any:
                    for w in words:
                        delta = {"delta": {"content": w}} if chat else {"text": w}
                        yield f"data: {json.dumps({'model': model, 'choices': [{'index': 0, **delta, 'finish_reason': None}]})}\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            text = "".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                      else {"index": 0, "text": text, "finish_reason": "stop"})
            return JSONResponse({"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                                 "model": model, "choices": [choice],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            return await complete(request, chat=True)

        return app
