"""The HTTP server: OpenAI-compatible endpoints, task endpoints, a web page, limits, errors and logs.

Endpoints (all JSON; errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`):
  POST /v1/chat/completions  (stream: server-sent events in OpenAI's chunk format, ending `data: [DONE]`)
  POST /v1/completions       (prompt: one string, or a list of strings without streaming)
  POST /v1/embeddings        (the --embedder model, else the generator's own mean-pooled hidden states)
  GET  /v1/models, GET /v1/models/{id}
  POST /v1/classify, /v1/summarize, /v1/translate, /v1/answer   (lmforge's task endpoints)
  GET  /health, GET / (the chat page), /static/*

Generation goes through `batching.Scheduler` (one worker thread, batched); embeddings and classification
run on a second thread, so the event loop only parses, validates and streams.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import GenerationError, LmforgeError, TokenizerError
from lmforge.serve.batching import Event, GenRequest, Overloaded, SamplingParams, Scheduler, ShuttingDown

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).resolve().parent / "static"


# ---- settings ------------------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    """Limits and names; every limit answers a clear 4xx when exceeded (see docs/serving.md)."""

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
    batch_window_ms: float = 10.0  # a burst is over when no request came for this long (batching.Scheduler)
    batch_max_wait_ms: float = 100.0  # the longest an idle worker waits for a batch to fill

    def validate(self) -> None:
        for name in ("max_concurrent", "max_tokens", "default_max_tokens", "max_body_bytes", "max_inputs"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise LmforgeError(f"serve: max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise LmforgeError(f"serve: max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclass
class Embedder:
    """A model + tokenizer used for /v1/embeddings."""

    model: Any
    tokenizer: Any
    name: str = "embedder"

    @classmethod
    def load(cls, name: str) -> Embedder:
        from lmforge.api import load

        model, tok = load(name)
        if tok is None:
            raise TokenizerError(f"{name}: no tokenizer files: cannot embed text")
        return cls(model, tok, name)


# ---- errors --------------------------------------------------------------------------------------------
class ApiError(LmforgeError):
    """An error answered in OpenAI's shape with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), code="shutting_down")
    if isinstance(e, LmforgeError):
        return ApiError(400, str(e), code="invalid_value")
    log.error("internal error: %r", e, exc_info=e)
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log", code="internal_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _as_api_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(e: ValidationError) -> ApiError:
    """Pydantic's first error -> one line naming the field: `max_tokens: Input should be a valid integer`."""
    errors = e.errors(include_url=False)
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "missing":
        return ApiError(400, f"missing required field '{param}'{more}", param=param, code="missing_field")
    where = f"'{param}'" if param else "request body"
    kind = "invalid_type" if first["type"].endswith(("_type", "_parsing")) else "invalid_value"
    return ApiError(400, f"{where}: {first['msg']}{more}", param=param, code=kind)


# ---- request bodies --------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, metadata, ...)


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; send 0 for greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # lmforge extension (OpenAI clients: extra_body)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)  # lmforge extension
    repetition_penalty: float = Field(1.0, gt=0.0)  # lmforge extension
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "n must be 1 (send several requests; they are batched together)", "n",
                           "unsupported_value")
        if self.frequency_penalty or self.presence_penalty:
            raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty",
                           "frequency_penalty" if self.frequency_penalty else "presence_penalty",
                           "unsupported_value")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_value")


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ClassifyRequest(_Body):
    input: str | list[str]
    model: str | None = None


class _Task(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # tasks default to greedy, as the CLI does
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None


class SummarizeRequest(_Task):
    text: str = Field(min_length=1)


class TranslateRequest(_Task):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    text: str = Field(min_length=1)
    to: str = Field(min_length=1)
    source: str | None = Field(None, alias="from")


class AnswerRequest(_Task):
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)


# ---- one generation, seen from the event loop ------------------------------------------------------------
class _Job:
    """Bridges a scheduler request (worker thread) to an asyncio queue of Events."""

    def __init__(self, sched: Scheduler, ids: list[int], params: SamplingParams) -> None:
        self.sched, self.loop = sched, asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.req = GenRequest(ids, params, self._emit)
        self.over = False

    def _emit(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def submit(self) -> _Job:
        self.sched.submit(self.req)
        return self

    async def events(self) -> AsyncIterator[Event]:
        while not self.over:
            ev = await self.queue.get()
            self.over = ev.kind in ("done", "error")
            yield ev

    def cancel(self) -> None:
        if not self.over:
            self.over = True
            self.sched.cancel(self.req)


class _ClientGone(Exception):
    pass


# ---- the app ---------------------------------------------------------------------------------------------
class _Server:
    """State shared by the handlers: models, limits, the scheduler and the auxiliary thread."""

    def __init__(self, generator, embedder, classifier, settings: ServeSettings) -> None:
        settings.validate()
        self.gen, self.cls, self.s = generator, classifier, settings
        if embedder is not None and not isinstance(embedder, Embedder):
            if isinstance(embedder, tuple):
                embedder = Embedder(*embedder)
            else:
                embedder = Embedder(embedder.model, embedder.tokenizer, getattr(embedder, "name", "embedder"))
        self.emb = embedder
        self.ctx = generator.model.cfg.context_length
        self.max_prompt = min(settings.max_prompt_tokens or self.ctx - 1, self.ctx - 1)
        self.sched = Scheduler(generator.model, generator.tokenizer, max_batch=settings.max_concurrent,
                               max_queue=settings.max_queue, window_s=settings.batch_window_ms / 1000,
                               max_wait_s=settings.batch_max_wait_ms / 1000)
        self.aux = ThreadPoolExecutor(1, thread_name_prefix="lmforge-aux")  # embeddings, classification
        self.aux_lock = threading.Lock()
        self.aux_active = 0
        self.started = time.time()
        self.model_id = settings.model_name or _short(getattr(generator, "name", "") or "lmforge")
        self.gen_names = {self.model_id, getattr(generator, "name", "") or self.model_id}
        if self.emb is not None:
            self.emb_id = settings.embedder_name or _short(self.emb.name)
            self.emb_names = {self.emb_id, self.emb.name}
        else:
            self.emb_id, self.emb_names = self.model_id, self.gen_names
        if classifier is not None:
            name = settings.classifier_name or _short(str(classifier.info.get("run_dir", "") or "classifier"))
            self.cls_id, self.cls_names = name, {name, settings.classifier_name or name}
        else:
            self.cls_id, self.cls_names = None, set()

    # -- checks
    def check_model(self, requested: str | None, names: set[str], what: str) -> None:
        if requested is None or requested in names:
            return
        served = sorted(m["id"] for m in self.models())
        raise ApiError(404, f"model '{requested}' is not served here for {what} (served: {', '.join(served)})",
                       "model", "model_not_found")

    def check_max_tokens(self, requested: int | None, param: str = "max_tokens") -> None:
        if requested is not None and requested > self.s.max_tokens:
            raise ApiError(400, f"{param} {requested} exceeds this server's limit of {self.s.max_tokens}", param,
                           "max_tokens_too_large")

    def resolve_max_tokens(self, requested: int | None, n_prompt: int, param: str = "max_tokens") -> int:
        room = self.ctx - n_prompt
        if requested is not None:
            if requested > room:
                raise ApiError(400, f"prompt of {n_prompt} tokens + {param} {requested} exceeds the model's "
                                    f"context length of {self.ctx} tokens", param, "context_length_exceeded")
            return requested
        n = min(self.s.default_max_tokens, self.s.max_tokens, room)
        if n < 1:
            raise ApiError(400, f"prompt of {n_prompt} tokens leaves no room in the model's context length of "
                                f"{self.ctx} tokens", "messages", "context_length_exceeded")
        return n

    def check_prompt(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, f"'{param}' is empty: give some text", param, "empty_prompt")
        if n > self.max_prompt:
            raise ApiError(400, f"prompt of {n} tokens is longer than this server's limit of {self.max_prompt} "
                                "tokens", param, "prompt_too_long")

    def models(self) -> list[dict[str, Any]]:
        created = int(self.started)
        out = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "lmforge",
                "context_length": self.ctx}]
        if self.emb is not None:
            out.append({"id": self.emb_id, "object": "model", "created": created, "owned_by": "lmforge"})
        if self.cls is not None:
            out.append({"id": self.cls_id, "object": "model", "created": created, "owned_by": "lmforge",
                        "labels": list(self.cls.labels)})
        return out

    # -- model work off the event loop
    async def in_aux(self, fn, *args):
        with self.aux_lock:
            if self.aux_active >= self.s.max_concurrent + self.s.max_queue:
                raise Overloaded(f"server busy: {self.aux_active} embedding/classification requests in flight",
                                 1)
            self.aux_active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.aux, fn, *args)
        finally:
            with self.aux_lock:
                self.aux_active -= 1

    async def encode(self, text: str, special: bool) -> list[int]:
        tok = self.gen.tokenizer
        return await asyncio.to_thread(tok.encode, text, special)

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        def render() -> list[int]:
            text = self.gen.format_chat(messages)
            return self.gen.tokenizer.encode(text, add_special_tokens=False)

        return await asyncio.to_thread(render)


def _short(name: str) -> str:
    """A path's last part (ids in /v1/models need not show the server's folders); names stay as they are."""
    if os.sep in name or name.endswith(".gguf"):
        return Path(name).name or name
    return name


def _params(body, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=getattr(body, "top_k", 0), min_p=getattr(body, "min_p", 0.0),
                          repetition_penalty=body.repetition_penalty, seed=body.seed,
                          stop=tuple(getattr(body, "stop", None) or ()))


def _note(request, **kw) -> None:
    """Fill in the request's log line (tokens in/out) for the middleware."""
    info = request.scope.get("state", {}).get("lmforge_log")
    if info is not None:
        info.update(kw)


async def _read_body(request, model: type[BaseModel], limit: int):
    """Read (bounded), parse and validate the JSON body ourselves: any content type, OpenAI-shaped errors."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body is larger than this server's limit of {limit} bytes", None,
                           "request_too_large")
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object", None, "invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"request body is not valid JSON: {getattr(e, 'msg', str(e))}{where}", None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_message(e) from None


async def _watch_disconnect(request, jobs: list[_Job]) -> None:
    """Non-streaming requests: when the client goes away, free its slots at once."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            _note(request, disconnected=True)
            for j in jobs:
                j.cancel()
                j.queue.put_nowait(Event("error", error=_ClientGone()))
            return


async def _collect(request, jobs: list[_Job]) -> list[tuple[str, str, int]]:
    """Run jobs to completion -> [(text, finish_reason, completion_tokens)]; raises their error."""
    watcher = asyncio.create_task(_watch_disconnect(request, jobs))
    try:
        out = []
        for j in jobs:
            parts, reason, n = [], "stop", 0
            async for ev in j.events():
                if ev.kind == "text":
                    parts.append(ev.text)
                elif ev.kind == "done":
                    reason, n = ev.finish_reason or "stop", ev.completion_tokens
                elif isinstance(ev.error, _ClientGone):  # nobody is listening; the log line says 499
                    raise ApiError(499, "client closed the request", None, "client_closed")
                else:
                    raise ev.error or RuntimeError("generation failed")
            out.append(("".join(parts), reason, n))
        return out
    finally:
        watcher.cancel()
        for j in jobs:
            j.cancel()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- middleware: log line, API key, body size --------------------------------------------------------------
class _Gate:
    """Pure ASGI (streams and disconnects pass through untouched): one log line per request, the API key on
    /v1/*, and a Content-Length check before any body is read."""

    def __init__(self, app, settings: ServeSettings) -> None:
        self.app, self.s = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: dict[str, Any] = {"status": None, "tokens_in": 0, "tokens_out": 0}
        scope.setdefault("state", {})["lmforge_log"] = info

        async def send_logged(msg) -> None:
            if msg["type"] == "http.response.start":
                info["status"] = msg["status"]
            await send(msg)

        try:
            err = self._check(scope)
            if err is not None:
                await _error_response(err)(scope, receive, send_logged)
                return
            await self.app(scope, receive, send_logged)
        except Exception:
            info["status"] = info["status"] or 500
            raise
        finally:
            ms = (time.perf_counter() - t0) * 1000
            extra = " (client disconnected)" if info.get("disconnected") else ""
            log.info("%s %s %s in=%d out=%d %.1fms%s", scope["method"], scope["path"], info["status"] or "-",
                     info["tokens_in"], info["tokens_out"], ms, extra)

    def _check(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.s.api_key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.s.api_key.encode()):
                why = "no API key given (send 'Authorization: Bearer KEY')" if not given else "incorrect API key"
                return ApiError(401, why, None, "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "invalid Content-Length header", None, "invalid_request")
            if int(length) > self.s.max_body_bytes:
                return ApiError(413, f"request body of {int(length)} bytes is larger than this server's limit of "
                                     f"{self.s.max_body_bytes} bytes", None, "request_too_large")
        return None


# ---- factory ------------------------------------------------------------------------------------------------
def create_app(generator, embedder=None, classifier=None, settings: ServeSettings | None = None):
    """A FastAPI app serving `generator` (an lmforge.api.Generator); optional embedder and classifier.

    embedder: an `Embedder`, a (model, tokenizer) pair, or anything with .model/.tokenizer; None = the
    generator's own model. classifier: a `lmforge.tasks.classify.LoadedClassifier`.
    """
    st = _Server(generator, embedder, classifier, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(_app):
        st.sched.start()
        try:
            yield
        finally:
            await asyncio.to_thread(st.sched.close)
            st.aux.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.lmforge = st

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return _error_response(e)

    @app.exception_handler(LmforgeError)
    async def _lm_error(_req, e: LmforgeError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, e: StarletteHTTPException):
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(e.status_code, str(e.detail))
        return _error_response(ApiError(e.status_code, msg, None, None))

    @app.exception_handler(Exception)
    async def _any_error(_req, e: Exception):
        return _error_response(e)

    # -- pages and health
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": st.model_id, "embedder": st.emb_id if st.emb is not None else None,
                "classifier": st.cls_id, "uptime_s": round(time.time() - st.started, 1),
                "generation": {"running": st.sched.running, "waiting": st.sched.waiting,
                               "max_concurrent": st.s.max_concurrent, "max_queue": st.s.max_queue,
                               **st.sched.stats},
                "limits": {"max_tokens": st.s.max_tokens, "max_prompt_tokens": st.max_prompt,
                           "context_length": st.ctx, "max_body_bytes": st.s.max_body_bytes},
                "api_key_required": bool(st.s.api_key)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": st.models()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for m in st.models():
            if m["id"] == model_id:
                return m
        raise ApiError(404, f"model '{model_id}' is not served here", "model", "model_not_found")

    # -- generation
    async def start_job(request: Request, ids: list[int], body, param: str, max_param: str = "max_tokens",
                        requested: int | None = None) -> _Job:
        st.check_prompt(len(ids), param)
        n = st.resolve_max_tokens(requested if requested is not None else body.max_tokens, len(ids), max_param)
        _note(request, tokens_in=len(ids))
        return _Job(st.sched, ids, _params(body, n)).submit()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatRequest = await _read_body(request, ChatRequest, st.s.max_body_bytes)
        st.check_model(body.model, st.gen_names, "chat completions")
        body.unsupported()
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        st.check_max_tokens(requested, max_param)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        ids = await st.chat_ids(messages)
        job = await start_job(request, ids, body, "messages", max_param, requested)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": st.model_id, "system_fingerprint": "lmforge"}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(delta: dict, finish: str | None = None) -> str:
                return _sse({**head, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            async def sse():
                async for piece in _stream_job(request, job, len(ids), head, include_usage,
                                               lambda t: chunk({"content": t}),
                                               lambda r: chunk({}, r), chunk({"role": "assistant", "content": ""})):
                    yield piece

            return StreamingResponse(sse(), media_type="text/event-stream", headers=_SSE_HEADERS)
        [(text, reason, n)] = await _collect(request, [job])
        _note(request, tokens_out=n)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": _usage(len(ids), n)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await _read_body(request, CompletionRequest, st.s.max_body_bytes)
        st.check_model(body.model, st.gen_names, "completions")
        body.unsupported()
        if body.echo or body.suffix:
            raise ApiError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix",
                           "unsupported_value")
        st.check_max_tokens(body.max_tokens)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
        if body.stream and len(prompts) > 1:
            raise ApiError(400, "stream with a list of prompts is not supported: send one prompt per request",
                           "prompt", "unsupported_value")
        if len(prompts) > st.s.max_concurrent + st.s.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most "
                                f"{st.s.max_concurrent + st.s.max_queue}", "prompt", "too_many_inputs")
        ids_list = []
        for p in prompts:
            if not p.strip():
                raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
            ids_list.append(await st.encode(p, True))
        for ids in ids_list:  # every check before any job starts
            st.check_prompt(len(ids), "prompt")
            st.resolve_max_tokens(body.max_tokens, len(ids))
        jobs: list[_Job] = []
        try:
            for ids in ids_list:
                jobs.append(await start_job(request, ids, body, "prompt"))
        except BaseException:
            for j in jobs:
                j.cancel()
            raise
        n_in = sum(map(len, ids_list))
        _note(request, tokens_in=n_in)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": st.model_id, "system_fingerprint": "lmforge"}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(text: str, finish: str | None = None) -> str:
                return _sse({**head, "object": "text_completion",
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

            async def sse():
                async for piece in _stream_job(request, jobs[0], n_in, head, include_usage, chunk,
                                               lambda r: chunk("", r), None):
                    yield piece

            return StreamingResponse(sse(), media_type="text/event-stream", headers=_SSE_HEADERS)
        results = await _collect(request, jobs)
        n_out = sum(r[2] for r in results)
        _note(request, tokens_out=n_out)
        return {**head, "object": "text_completion",
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                            for i, (t, r, _) in enumerate(results)],
                "usage": _usage(n_in, n_out)}

    # -- task endpoints (zero-shot prompts through the chat template, as the CLI verbs do)
    async def run_task(request: Request, body: _Task, prompt: str, default_new: int) -> tuple[str, str, dict]:
        st.check_model(body.model, st.gen_names, "task endpoints")
        st.check_max_tokens(body.max_tokens)
        ids = await st.chat_ids([{"role": "user", "content": prompt}])
        requested = body.max_tokens if body.max_tokens is not None else min(default_new, st.s.max_tokens,
                                                                            max(1, st.ctx - len(ids)))
        job = await start_job(request, ids, body, "text", requested=requested)
        [(text, reason, n)] = await _collect(request, [job])
        _note(request, tokens_out=n)
        return text.strip(), reason, _usage(len(ids), n)

    @app.post("/v1/summarize")
    async def summarize(request: Request):
        from lmforge.tasks.prompts import summarize_prompt

        body: SummarizeRequest = await _read_body(request, SummarizeRequest, st.s.max_body_bytes)
        text, reason, usage = await run_task(request, body, summarize_prompt(body.text), 160)
        return {"object": "summary", "model": st.model_id, "summary": text, "finish_reason": reason, "usage": usage}

    @app.post("/v1/translate")
    async def translate(request: Request):
        from lmforge.tasks.prompts import language_name, translate_prompt

        body: TranslateRequest = await _read_body(request, TranslateRequest, st.s.max_body_bytes)
        for value, param in ((body.to, "to"), (body.source, "from")):
            if value is not None:
                try:
                    language_name(value, param)
                except GenerationError as e:
                    raise ApiError(400, str(e).replace("--", ""), param, "unknown_language") from None
        prompt = translate_prompt(body.text, body.to, body.source)
        text, reason, usage = await run_task(request, body, prompt, 256)
        return {"object": "translation", "model": st.model_id, "translation": text, "to": body.to,
                "finish_reason": reason, "usage": usage}

    @app.post("/v1/answer")
    async def answer(request: Request):
        from lmforge.tasks.prompts import answer_prompt

        body: AnswerRequest = await _read_body(request, AnswerRequest, st.s.max_body_bytes)
        text, reason, usage = await run_task(request, body, answer_prompt(body.context, body.question), 64)
        return {"object": "answer", "model": st.model_id, "answer": text, "finish_reason": reason, "usage": usage}

    # -- embeddings and classification (second thread)
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body: EmbeddingRequest = await _read_body(request, EmbeddingRequest, st.s.max_body_bytes)
        st.check_model(body.model, st.emb_names, "embeddings")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'input' must be a string or a non-empty list of strings (token ids are not "
                                "supported)", "input", "invalid_value")
        if len(texts) > st.s.max_inputs:
            raise ApiError(400, f"{len(texts)} inputs in one request; this server takes at most {st.s.max_inputs}",
                           "input", "too_many_inputs")
        model, tok = (st.emb.model, st.emb.tokenizer) if st.emb is not None else (st.gen.model, st.gen.tokenizer)
        limit = min(st.max_prompt, model.cfg.context_length)

        def work():
            from lmforge.api import embed_texts

            lengths = [len(tok.encode(t)) for t in texts]
            for i, n in enumerate(lengths):
                if n == 0 or not texts[i].strip():
                    raise ApiError(400, f"input[{i}] is empty", "input", "empty_input")
                if n > limit:
                    raise ApiError(400, f"input[{i}] has {n} tokens; the limit is {limit}", "input",
                                   "context_length_exceeded")
            return lengths, embed_texts(model, tok, texts, normalize=True)

        lengths, vecs = await st.in_aux(work)
        if body.dimensions is not None and body.dimensions != vecs.shape[1]:
            raise ApiError(400, f"dimensions {body.dimensions} is not supported: this model gives {vecs.shape[1]}",
                           "dimensions", "unsupported_value")
        _note(request, tokens_in=sum(lengths))
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vecs]
        else:
            data = vecs.tolist()
        return {"object": "list", "model": st.emb_id,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body: ClassifyRequest = await _read_body(request, ClassifyRequest, st.s.max_body_bytes)
        if st.cls is None:
            raise ApiError(404, "no classifier is loaded (start the server with --classifier RUN_DIR)", "model",
                           "model_not_found")
        st.check_model(body.model, st.cls_names, "classification")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "'input' is an empty list", "input", "empty_input")
        if len(texts) > st.s.max_inputs:
            raise ApiError(400, f"{len(texts)} inputs in one request; this server takes at most {st.s.max_inputs}",
                           "input", "too_many_inputs")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(400, f"input[{i}] is empty", "input", "empty_input")
            if len(t) > st.s.max_body_bytes:
                raise ApiError(413, f"input[{i}] is too long", "input", "request_too_large")

        def work():
            from lmforge.tasks.classify import predict

            return _count_tokens(st.cls.tokenizer, texts), predict(st.cls, texts)

        n_in, preds = await st.in_aux(work)
        _note(request, tokens_in=n_in)
        return {"object": "list", "model": st.cls_id,
                "data": [{"index": i, **p} for i, p in enumerate(preds)],
                "usage": {"prompt_tokens": n_in, "total_tokens": n_in}}

    app.add_middleware(_Gate, settings=st.s)
    return app


def _count_tokens(tok, texts: list[str]) -> int:
    try:
        return sum(len(tok.encode(t)) for t in texts)
    except Exception:  # a tokenizer without encode (GloVe words): count words
        return sum(len(t.split()) for t in texts)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _stream_job(request, job: _Job, n_in: int, head: dict, include_usage: bool, text_chunk, end_chunk,
                      first: str | None) -> AsyncIterator[str]:
    """SSE pieces for one job; a client that goes away (the task is cancelled) frees its slot at once."""
    n_out = 0
    try:
        if first is not None:
            yield first
        async for ev in job.events():
            if ev.kind == "text":
                yield text_chunk(ev.text)
            elif ev.kind == "done":
                n_out = ev.completion_tokens
                yield end_chunk(ev.finish_reason or "stop")
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk" if first else "text_completion",
                                "choices": [], "usage": _usage(n_in, n_out)})
            else:
                err = _as_api_error(ev.error or RuntimeError("generation failed"))
                yield _sse(err.body())
                return
        yield "data: [DONE]\n\n"
    finally:
        if not job.over:
            _note(request, disconnected=True)
        job.cancel()
        _note(request, tokens_out=n_out or job.req.completion_tokens)


# ---- running it ----------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn in a daemon thread on a loopback port the OS picks: for tests, benchmarks and notebooks."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket

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
