"""The HTTP server: the app factory, its lifespan, and a background runner for tests.

Endpoints (all JSON; errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`):
  POST /v1/chat/completions  (stream: server-sent events in OpenAI's chunk format, ending `data: [DONE]`)
  POST /v1/completions       (prompt: one string, or a list of strings without streaming)
  POST /v1/embeddings        (the --embedder model, else the generator's own mean-pooled hidden states)
  GET  /v1/models, GET /v1/models/{id}
  POST /v1/classify, /v1/summarize, /v1/translate, /v1/answer   (lmforge's task endpoints)
  GET/POST /v1/adapters, DELETE /v1/adapters/{name}   (LoRA adapters over the base, adapter_routes.py)
  GET  /health, GET /metrics (Prometheus text format), GET / (the chat page), /static/*

Settings live in settings.py, the shared state in state.py, the handlers in openai_routes.py, task_routes.py
and server_routes.py (their shared plumbing in routes_common.py), request bodies in schemas.py, the error
shape in errors.py, and the Host / API key / Content-Type / CORS gate in middleware.py.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve import adapter_routes, openai_routes, server_routes, task_routes
from lmforge.serve.errors import ApiError, error_response
from lmforge.serve.middleware import Gate, header_timeout_protocol
from lmforge.serve.server_routes import STATIC
from lmforge.serve.settings import Embedder, ServeSettings
from lmforge.serve.state import ServerState

# Embedder and ServeSettings live in settings.py; importing them from here keeps working
__all__ = ["BackgroundServer", "Embedder", "ServeSettings", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI):
    st: ServerState = app.state.lmforge
    st.sched.start()
    try:
        yield
    finally:
        await st.close()


async def on_error(_request, e: Exception):
    """Every exception a handler raises, in OpenAI's shape (ApiError and LmforgeError 4xx, others 500)."""
    if isinstance(e, StarletteHTTPException):
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, msg, None, None))
    return error_response(e)


def create_app(generator, embedder=None, classifier=None, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `generator` (a Generator); optional embedder and classifier.

    embedder: an `Embedder`, a (model, tokenizer) pair, or anything with .model/.tokenizer; None = the
    generator's own model. classifier: a `lmforge.tasks.classify.LoadedClassifier`.
    """
    settings = settings or ServeSettings()
    settings.validate()
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.lmforge = ServerState(generator, Embedder.of(embedder), classifier, settings)
    for exc in (StarletteHTTPException, LmforgeError, Exception):  # Exception alone would reach only the 500 layer
        app.add_exception_handler(exc, on_error)
    for routes in (server_routes, openai_routes, task_routes, adapter_routes):
        app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, settings=settings, metrics=app.state.lmforge.metrics)
    return app


class BackgroundServer:
    """uvicorn in a daemon thread on a loopback port the OS picks: for tests, benchmarks and notebooks."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        cfg = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30,
                             backlog=1024, http=header_timeout_protocol())
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="lmforge-uvicorn")

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise LmforgeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
