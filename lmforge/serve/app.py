"""The HTTP server: settings, the app factory, its lifespan, and a background runner for tests.

Endpoints (all JSON; errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`):
  POST /v1/chat/completions  (stream: server-sent events in OpenAI's chunk format, ending `data: [DONE]`)
  POST /v1/completions       (prompt: one string, or a list of strings without streaming)
  POST /v1/embeddings        (the --embedder model, else the generator's own mean-pooled hidden states)
  GET  /v1/models, GET /v1/models/{id}
  POST /v1/classify, /v1/summarize, /v1/translate, /v1/answer   (lmforge's task endpoints)
  GET  /health, GET /metrics (Prometheus text format), GET / (the chat page), /static/*

The handlers live in routes.py, request bodies in schemas.py, the error shape in errors.py, and the Host /
API key / Content-Type / CORS gate in middleware.py.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError, TokenizerError
from lmforge.serve.errors import ApiError, error_response
from lmforge.serve.middleware import Gate
from lmforge.serve.routes import STATIC, ServerState, router

ORIGIN = re.compile(r"^https?://[^/\s]+$")


@dataclass
class ServeSettings:
    """Limits, names and access rules; every limit answers a clear 4xx when exceeded (see docs/serving.md)."""

    model_name: str | None = None  # id in /v1/models (default: the generator's name, without its folders)
    embedder_name: str | None = None
    classifier_name: str | None = None
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`
    max_concurrent: int = 16  # generations run together (rows of one batch)
    max_queue: int = 64  # generations that may wait beyond those; more get 429
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (lowered to fit the context)
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256  # texts per /v1/embeddings or /v1/classify request
    prefix_cache_mb: int = 256  # keys/values of earlier prompts kept for reuse by the next chat turn (0 = off)
    host: str = "127.0.0.1"  # the bound address: a Host header naming it is accepted, as are the localhost names
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names ("*" any, ".example.com" a domain)
    cors_origin: str | None = None  # the one origin that gets CORS headers ("*" any); none by default

    def validate(self) -> None:
        for name in ("max_concurrent", "max_tokens", "default_max_tokens", "max_body_bytes", "max_inputs"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise LmforgeError(f"serve: prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.max_queue < 0:
            raise LmforgeError(f"serve: max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise LmforgeError(f"serve: max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for h in self.allowed_hosts:
            if not h.strip() or "/" in h or any(c.isspace() for c in h):
                raise LmforgeError(f"serve: allowed_hosts entry {h!r} is not a host name (e.g. myserver.lan)")
        if self.cors_origin is not None and self.cors_origin != "*" and not ORIGIN.match(self.cors_origin):
            raise LmforgeError(f"serve: cors_origin {self.cors_origin!r} is not an origin: give scheme://host[:port] "
                               "without a path (e.g. https://example.com), or *")


@dataclass
class Embedder:
    """A model + tokenizer used for /v1/embeddings."""

    model: Any
    tokenizer: Any
    name: str = "embedder"

    @classmethod
    def load(cls, name: str, device: str = "cpu") -> Embedder:
        from lmforge.checkpoints import load

        model, tok = load(name, device=device)
        if tok is None:
            raise TokenizerError(f"{name}: no tokenizer files: cannot embed text")
        return cls(model, tok, name)

    @classmethod
    def of(cls, embedder) -> Embedder | None:
        """An Embedder, a (model, tokenizer) pair, anything with .model/.tokenizer, or None."""
        if embedder is None or isinstance(embedder, Embedder):
            return embedder
        if isinstance(embedder, tuple):
            return cls(*embedder)
        return cls(embedder.model, embedder.tokenizer, getattr(embedder, "name", "embedder"))


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
    app.include_router(router)
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
                             backlog=1024)
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
