"""Running an app under uvicorn: in the foreground (``cladapt serve``/``proxy``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


KEEP_ALIVE_S = 30


def run(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted (Ctrl-C)."""
    import uvicorn

    # keep-alive above uvicorn's 5 s: a client whose pooled connection the server closes while it
    # reuses it gets a ReadError, and queued requests under load can sit idle that long
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S)


class BackgroundServer:
    """``app`` served by uvicorn in a thread on ``host`` and a free port (tests, benchmarks).

    Usage: ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        import socket
        import threading

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                     timeout_keep_alive=KEEP_ALIVE_S))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
