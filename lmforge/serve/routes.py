"""The endpoints, as module-level handlers that read the server's state from `request.app.state.lmforge`.

Generation goes through `batching.Scheduler` (one worker thread, batched); embeddings and classification
run on a second thread, so the event loop only parses, validates and streams.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse

from lmforge.errors import GenerationError
from lmforge.serve.batching import Event, GenRequest, Overloaded, SamplingParams, Scheduler
from lmforge.serve.errors import ApiError, as_api_error
from lmforge.serve.schemas import (
    AnswerRequest,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    SummarizeRequest,
    TaskRequest,
    TranslateRequest,
    parse_request,
)

if TYPE_CHECKING:
    from lmforge.serve.app import Embedder, ServeSettings

STATIC = Path(__file__).resolve().parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
router = APIRouter()


# ---- state ----------------------------------------------------------------------------------------------
class ServerState:
    """What the handlers share: models, limits, the scheduler and the auxiliary thread (app.state.lmforge)."""

    def __init__(self, generator, embedder: Embedder | None, classifier, settings: ServeSettings) -> None:
        self.gen, self.emb, self.cls, self.s = generator, embedder, classifier, settings
        self.ctx = generator.model.cfg.context_length
        self.max_prompt = min(settings.max_prompt_tokens or self.ctx - 1, self.ctx - 1)
        self.sched = Scheduler(generator.model, generator.tokenizer, max_batch=settings.max_concurrent,
                               max_queue=settings.max_queue, window_s=settings.batch_window_ms / 1000,
                               max_wait_s=settings.batch_max_wait_ms / 1000)
        self.aux = ThreadPoolExecutor(1, thread_name_prefix="lmforge-aux")  # embeddings, classification
        self.aux_lock = threading.Lock()
        self.aux_active = 0
        self.started = time.time()
        self.model_id = settings.model_name or short_name(getattr(generator, "name", "") or "lmforge")
        self.gen_names = {self.model_id, getattr(generator, "name", "") or self.model_id}
        if embedder is not None:
            self.emb_id = settings.embedder_name or short_name(embedder.name)
            self.emb_names = {self.emb_id, embedder.name}
        else:
            self.emb_id, self.emb_names = self.model_id, self.gen_names
        if classifier is not None:
            name = settings.classifier_name or short_name(str(classifier.info.get("run_dir", "") or "classifier"))
            self.cls_id, self.cls_names = name, {name}
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
                                    f"context length of {self.ctx}", param, "context_length_exceeded")
            return requested
        return max(1, min(self.s.default_max_tokens, room))

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
    async def in_aux(self, fn: Callable, *args):
        with self.aux_lock:
            if self.aux_active >= self.s.max_concurrent + self.s.max_queue:
                raise Overloaded(f"server busy: {self.aux_active} embedding/classification requests in flight", 1)
            self.aux_active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.aux, fn, *args)
        finally:
            with self.aux_lock:
                self.aux_active -= 1

    async def encode(self, text: str, special: bool) -> list[int]:
        return await asyncio.to_thread(self.gen.tokenizer.encode, text, special)

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        def render() -> list[int]:
            text = self.gen.format_chat(messages)
            return self.gen.tokenizer.encode(text, add_special_tokens=False)

        return await asyncio.to_thread(render)

    async def close(self) -> None:
        await asyncio.to_thread(self.sched.close)
        self.aux.shutdown(wait=False, cancel_futures=True)


def short_name(name: str) -> str:
    """A path's last part (ids in /v1/models need not show the server's folders); names stay as they are."""
    if os.sep in name or name.endswith(".gguf"):
        return Path(name).name or name
    return name


def state(request: Request) -> ServerState:
    return request.app.state.lmforge


# ---- one generation, seen from the event loop ------------------------------------------------------------
class Job:
    """Bridges a scheduler request (worker thread) to an asyncio queue of Events."""

    def __init__(self, sched: Scheduler, ids: list[int], params: SamplingParams) -> None:
        self.sched, self.loop = sched, asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.req = GenRequest(ids, params, self.emit)
        self.over = False

    def emit(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    def submit(self) -> Job:
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


class ClientGone(Exception):
    """The client closed a non-streaming request: nobody reads the answer (logged as 499)."""


def sampling_params(body, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=getattr(body, "top_k", 0), min_p=getattr(body, "min_p", 0.0),
                          repetition_penalty=body.repetition_penalty, seed=body.seed,
                          stop=tuple(getattr(body, "stop", None) or ()))


def note(request: Request, **kw) -> None:
    """Fill in the request's log line (tokens in/out) for the middleware."""
    info = request.scope.get("state", {}).get("lmforge_log")
    if info is not None:
        info.update(kw)


async def read_body(request: Request, model: type):
    """Read the body (bounded by max_body_bytes while reading, for bodies without Content-Length), then parse."""
    limit = state(request).s.max_body_bytes
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body is larger than this server's limit of {limit} bytes", None,
                           "request_too_large")
    return parse_request(bytes(raw), model)


async def start_job(request: Request, ids: list[int], body, param: str, max_param: str = "max_tokens",
                    requested: int | None = None) -> Job:
    st = state(request)
    st.check_prompt(len(ids), param)
    n = st.resolve_max_tokens(requested if requested is not None else body.max_tokens, len(ids), max_param)
    note(request, tokens_in=len(ids))
    return Job(st.sched, ids, sampling_params(body, n)).submit()


async def watch_disconnect(request: Request, jobs: list[Job]) -> None:
    """Non-streaming requests: when the client goes away, free its slots at once."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            note(request, disconnected=True)
            for j in jobs:
                j.cancel()
                j.queue.put_nowait(Event("error", error=ClientGone()))
            return


async def collect(request: Request, jobs: list[Job]) -> list[tuple[str, str, int]]:
    """Run jobs to completion -> [(text, finish_reason, completion_tokens)]; raises their error."""
    watcher = asyncio.create_task(watch_disconnect(request, jobs))
    try:
        out = []
        for j in jobs:
            parts, reason, n = [], "stop", 0
            async for ev in j.events():
                if ev.kind == "text":
                    parts.append(ev.text)
                elif ev.kind == "done":
                    reason, n = ev.finish_reason or "stop", ev.completion_tokens
                elif isinstance(ev.error, ClientGone):  # nobody is listening; the log line says 499
                    raise ApiError(499, "client closed the request", None, "client_closed")
                else:
                    raise ev.error or RuntimeError("generation failed")
            out.append(("".join(parts), reason, n))
        return out
    finally:
        watcher.cancel()
        for j in jobs:
            j.cancel()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timings(jobs: list[Job], n_in: int) -> dict[str, Any]:
    """Speed figures next to `usage` (an lmforge extension; OpenAI clients ignore it).

    Times count from when the request reached the scheduler (after tokenization): the queue wait, the time to
    the first token (queue + prefill + one step), and the decode speed after the first token.
    """
    reqs = [j.req for j in jobs]
    t0 = min(r.enqueued_at for r in reqs)
    starts = [r.started_at for r in reqs if r.started_at is not None]
    firsts = [r.first_token_at for r in reqs if r.first_token_at is not None]
    ends = [r.finished_at for r in reqs if r.finished_at is not None]
    n_out = sum(r.completion_tokens for r in reqs)
    first, end = (min(firsts) if firsts else None), (max(ends) if ends else None)
    decode_s = end - first if first is not None and end is not None else 0.0
    after_first = n_out - len(reqs)

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - t0) * 1000, 1)

    return {"prompt_tokens": n_in, "completion_tokens": n_out, "queue_ms": ms(min(starts) if starts else None),
            "time_to_first_token_ms": ms(first), "total_ms": ms(end),
            "tokens_per_second": round(after_first / decode_s, 1) if decode_s > 0 and after_first > 0 else None}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_job(request: Request, job: Job, n_in: int, head: dict, include_usage: bool, text_chunk,
                     end_chunk, first: str | None) -> AsyncIterator[str]:
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
                    yield sse({**head, "object": "chat.completion.chunk" if first else "text_completion",
                               "choices": [], "usage": usage(n_in, n_out), "timings": timings([job], n_in)})
            else:
                err = as_api_error(ev.error or RuntimeError("generation failed"))
                yield sse(err.body())
                return
        yield "data: [DONE]\n\n"
    finally:
        if not job.over:
            note(request, disconnected=True)
        job.cancel()
        note(request, tokens_out=n_out or job.req.completion_tokens)


# ---- pages, health, models -------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health")
async def health(request: Request):
    st = state(request)
    return {"status": "ok", "model": st.model_id, "embedder": st.emb_id if st.emb is not None else None,
            "classifier": st.cls_id, "uptime_s": round(time.time() - st.started, 1),
            "generation": {"running": st.sched.running, "waiting": st.sched.waiting,
                           "max_concurrent": st.s.max_concurrent, "max_queue": st.s.max_queue, **st.sched.stats},
            "limits": {"max_tokens": st.s.max_tokens, "max_prompt_tokens": st.max_prompt, "context_length": st.ctx,
                       "max_body_bytes": st.s.max_body_bytes},
            "api_key_required": bool(st.s.api_key)}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": state(request).models()}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    for m in state(request).models():
        if m["id"] == model_id:
            return m
    raise ApiError(404, f"model '{model_id}' is not served here", "model", "model_not_found")


# ---- generation ------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = state(request)
    body: ChatRequest = await read_body(request, ChatRequest)
    st.check_model(body.model, st.gen_names, "chat completions")
    body.unsupported()
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    st.check_max_tokens(requested, max_param)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    ids = await st.chat_ids(messages)
    job = await start_job(request, ids, body, "messages", max_param, requested)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": st.model_id,
            "system_fingerprint": "lmforge"}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> str:
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        pieces = stream_job(request, job, len(ids), head, include_usage, lambda t: chunk({"content": t}),
                            lambda r: chunk({}, r), chunk({"role": "assistant", "content": ""}))
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    [(text, reason, n)] = await collect(request, [job])
    note(request, tokens_out=n)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": usage(len(ids), n), "timings": timings([job], len(ids))}


@router.post("/v1/completions")
async def completions(request: Request):
    st = state(request)
    body: CompletionRequest = await read_body(request, CompletionRequest)
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
    jobs: list[Job] = []
    try:
        for ids in ids_list:
            jobs.append(await start_job(request, ids, body, "prompt"))
    except BaseException:
        for j in jobs:
            j.cancel()
        raise
    n_in = sum(map(len, ids_list))
    note(request, tokens_in=n_in)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": st.model_id,
            "system_fingerprint": "lmforge"}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(text: str, finish: str | None = None) -> str:
            return sse({**head, "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

        pieces = stream_job(request, jobs[0], n_in, head, include_usage, chunk, lambda r: chunk("", r), None)
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    results = await collect(request, jobs)
    n_out = sum(r[2] for r in results)
    note(request, tokens_out=n_out)
    return {**head, "object": "text_completion",
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                        for i, (t, r, _) in enumerate(results)],
            "usage": usage(n_in, n_out), "timings": timings(jobs, n_in)}


# ---- task endpoints (zero-shot prompts through the chat template, as the CLI verbs do) -----------------------
async def run_task(request: Request, body: TaskRequest, prompt: str, default_new: int) -> tuple[str, str, dict]:
    """-> (text, finish_reason, {"usage", "timings"}) for one task prompt."""
    st = state(request)
    st.check_model(body.model, st.gen_names, "task endpoints")
    st.check_max_tokens(body.max_tokens)
    ids = await st.chat_ids([{"role": "user", "content": prompt}])
    requested = body.max_tokens if body.max_tokens is not None else min(default_new, st.s.max_tokens,
                                                                        max(1, st.ctx - len(ids)))
    job = await start_job(request, ids, body, "text", requested=requested)
    [(text, reason, n)] = await collect(request, [job])
    note(request, tokens_out=n)
    return text.strip(), reason, {"usage": usage(len(ids), n), "timings": timings([job], len(ids))}


@router.post("/v1/summarize")
async def summarize(request: Request):
    from lmforge.tasks.prompts import summarize_prompt

    body: SummarizeRequest = await read_body(request, SummarizeRequest)
    text, reason, extra = await run_task(request, body, summarize_prompt(body.text), 160)
    return {"object": "summary", "model": state(request).model_id, "summary": text, "finish_reason": reason,
            **extra}


@router.post("/v1/translate")
async def translate(request: Request):
    from lmforge.tasks.prompts import language_name, translate_prompt

    body: TranslateRequest = await read_body(request, TranslateRequest)
    for value, param in ((body.to, "to"), (body.source, "from")):
        if value is not None:
            try:
                language_name(value, param)
            except GenerationError as e:
                raise ApiError(400, str(e).replace("--", ""), param, "unknown_language") from None
    text, reason, extra = await run_task(request, body, translate_prompt(body.text, body.to, body.source), 256)
    return {"object": "translation", "model": state(request).model_id, "translation": text, "to": body.to,
            "finish_reason": reason, **extra}


@router.post("/v1/answer")
async def answer(request: Request):
    from lmforge.tasks.prompts import answer_prompt

    body: AnswerRequest = await read_body(request, AnswerRequest)
    text, reason, extra = await run_task(request, body, answer_prompt(body.context, body.question), 64)
    return {"object": "answer", "model": state(request).model_id, "answer": text, "finish_reason": reason,
            **extra}


# ---- embeddings and classification (second thread) ----------------------------------------------------------
@router.post("/v1/embeddings")
async def embeddings(request: Request):
    st = state(request)
    body: EmbeddingRequest = await read_body(request, EmbeddingRequest)
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
        from lmforge.model.heads import embed_texts

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
    note(request, tokens_in=sum(lengths))
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vecs]
    else:
        data = vecs.tolist()
    return {"object": "list", "model": st.emb_id,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}}


def count_tokens(tok, texts: list[str]) -> int:
    try:
        return sum(len(tok.encode(t)) for t in texts)
    except Exception:  # a tokenizer without encode (GloVe words): count words
        return sum(len(t.split()) for t in texts)


@router.post("/v1/classify")
async def classify(request: Request):
    st = state(request)
    body: ClassifyRequest = await read_body(request, ClassifyRequest)
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

        return count_tokens(st.cls.tokenizer, texts), predict(st.cls, texts)

    n_in, preds = await st.in_aux(work)
    note(request, tokens_in=n_in)
    return {"object": "list", "model": st.cls_id, "data": [{"index": i, **p} for i, p in enumerate(preds)],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in}}
