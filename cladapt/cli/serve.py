"""Serving commands: ``serve`` (the OpenAI-compatible server) and ``proxy`` (a routing front for vLLM).

Both need the ``serve`` extra (``pip install 'cladapt[serve]'``); ``make`` installs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from cladapt.cli.common import console, err_console, open_store, registry_option
from cladapt.errors import CladaptError


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CladaptError(f"serving needs the 'serve' extra ({exc.name} is missing)",
                           hint="pip install 'cladapt[serve]'") from exc


def _settings(pairs: tuple[str, ...]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--router-set {text!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(raw)
    return out


@click.command("serve")
@registry_option
@click.option("--config", "configs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML settings (keys of configs/serve/default.yaml), applied in order")
@click.option("--base-model", default=None, help="base model (default: the one the newest version was trained on)")
@click.option("--served-model-name", default=None, help="the base model's name in /v1/models")
@click.option("--router", default=None, help="router for model='auto' (dtkr, mos, sum, ...)")
@click.option("--router-set", "router_set", multiple=True, metavar="KEY=VALUE", help="a router setting (repeatable)")
@click.option("--host", default=None, help="bind address [127.0.0.1]")
@click.option("--port", type=int, default=None, help="port [8000]")
@click.option("--max-batch-size", type=int, default=None)
@click.option("--cache-capacity", type=int, default=None, help="adapters loaded at once")
@click.option("--pin", multiple=True, help="adapter kept loaded (repeatable)")
@click.option("--admin-token", default=None, envvar="CLADAPT_ADMIN_TOKEN",
              help="bearer token of the admin endpoints [env CLADAPT_ADMIN_TOKEN; none: disabled]")
@click.option("--device", default=None, help="torch device (cpu, cuda)")
@click.option("--threads", type=int, default=None, help="torch CPU threads (1 helps on a shared, busy CPU)")
def serve_cmd(registry: Path | None, configs: tuple[Path, ...], base_model: str | None, served_model_name: str | None,
              router: str | None, router_set: tuple[str, ...], host: str | None, port: int | None,
              max_batch_size: int | None, cache_capacity: int | None, pin: tuple[str, ...], admin_token: str | None,
              device: str | None, threads: int | None) -> None:
    """Serve the registry's adapters with an OpenAI-compatible API (completions, chat, models, metrics).

    \b
    cladapt serve --registry ./reg --router dtkr --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model":"auto","messages":[{"role":"user","content":"..."}]}'
    model: auto (routed) | task | task@N | sum | the base model's name
    """
    _require_extra()
    from cladapt.serve.app import create_app
    from cladapt.serve.running import run
    from cladapt.serve.server import Server, load_serve_config

    config = load_serve_config(
        configs, base_model=base_model, served_model_name=served_model_name, router=router, host=host, port=port,
        max_batch_size=max_batch_size, cache_capacity=cache_capacity, pin=list(pin) or None,
        admin_token=admin_token, device=device, threads=threads, router_config=_settings(router_set) or None,
    )
    server = Server(config, open_store(registry)).start()
    try:
        models = server.catalog.models(router=config.router, max_len=server.engine.max_context)
        err_console.print(f"serving {server.served_name} with {len(models) - 1} adapter name(s) on "
                          f"http://{config.host}:{config.port}/v1 (router: {config.router or 'none'}; "
                          f"admin: {'on' if config.admin_token else 'off'})", highlight=False)
        run(create_app(server), config.host, config.port)
    finally:
        server.close()


@click.command("proxy")
@registry_option
@click.option("--upstream", "upstreams", multiple=True, required=True,
              help="base URL of a vLLM (or cladapt serve) server (repeatable: adapters spread with affinity)")
@click.option("--router", default=None, help="router for model='auto'")
@click.option("--router-set", "router_set", multiple=True, metavar="KEY=VALUE", help="a router setting (repeatable)")
@click.option("--base-model-id", default=None, help="the model id the upstreams serve (default: asked upstream)")
@click.option("--adapter-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where adapters are written for the upstreams (must be visible to them) [<registry>/.work/proxy]")
@click.option("--upstream-api-key", default=None, envvar="CLADAPT_UPSTREAM_API_KEY", help="bearer token sent upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9000, show_default=True)
def proxy_cmd(registry: Path | None, upstreams: tuple[str, ...], router: str | None, router_set: tuple[str, ...],
              base_model_id: str | None, adapter_dir: Path | None, upstream_api_key: str | None, host: str,
              port: int) -> None:
    """Route OpenAI requests to adapters on vLLM: load before first use, rewrite model, stream through.

    \b
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora
    cladapt proxy --registry ./reg --router dtkr --upstream http://gpu-host:8000 --port 9000
    """
    _require_extra()
    from cladapt.serve.proxy import ProxyConfig, build_proxy, create_proxy_app
    from cladapt.serve.running import run

    config = ProxyConfig(upstreams=list(upstreams), router=router, router_config=_settings(router_set),
                         base_model_id=base_model_id, adapter_dir=adapter_dir, upstream_api_key=upstream_api_key)
    proxy = build_proxy(config, open_store(registry))
    console.print(f"proxy on http://{host}:{port}/v1 -> {', '.join(upstreams)} (router: {router or 'none'})",
                  highlight=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(create_proxy_app(proxy), host, port)


commands: list[click.Command] = [serve_cmd, proxy_cmd]
