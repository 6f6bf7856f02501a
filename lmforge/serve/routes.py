"""The endpoints, as module-level handlers that read the server's state from `request.app.state.lmforge`.

Generation goes through `batching.Scheduler` (one worker thread, batched); embeddings and classification
run on a second thread, so the event loop only parses, validates and streams.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from lmforge.errors import GenerationError
from lmforge.serve.batching import Event, GenRequest, Overloaded, SamplingParams, Scheduler, TokenLogprob
from lmforge.serve.errors import ApiError, as_api_error
from lmforge.serve.logprobs import LogprobFormatter
from lmforge.serve.metrics import Metrics
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
        self.metrics = Metrics()
        self.sched = Scheduler(generator.model, generator.tokenizer, max_batch=settings.max_concurrent,
                               max_queue=settings.max_queue, metrics=self.metrics,
                               prefix_cache_bytes=settings.prefix_cache_mb << 20,
                               # the engine traces batch-1 steps; it has no inductor path, so "on" means "trace"
                               compile={"on": "trace"}.get(generator.compile, generator.compile))
        self.metrics.watch(self.sched)
        self.logprobs = LogprobFormatter(generator.tokenizer)
        self.aux = ThreadPoolExecutor(1, thread_name_prefix="lmforge-aux")  # embeddings, classification
        self.aux_lock = threading.Lock()
        self.aux_active = 0
        self.started = time.time()
        self.model_id = settings.model_name or short_name(getattr(generator, "name", "") or "lmforge")
        self.gen_names = {self.model_id, getattr(generator, "name", "") or self.model_id}
        self.gen_path = getattr(generator, "name", "") or None  # where it was loaded from (sentence_budget)
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


# ---- one generation request (its n choices, or its prompts), seen from the event loop ------------------------
GROUPS = itertools.count(1)  # seeded requests: their rows share a group and run as one batch of their own


class Job:
    """Bridges a request's scheduler rows (worker thread) to one asyncio queue of (row, Event)."""

    def __init__(self, sched: Scheduler, rows: list[tuple[list[int], SamplingParams]]) -> None:
        self.sched, self.loop = sched, asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.reqs = [GenRequest(ids, params, functools.partial(self.emit, i)) for i, (ids, params) in enumerate(rows)]
        self.open = len(self.reqs)  # rows not done yet
        self.over = False

    def emit(self, row: int, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, ev))

    def submit(self) -> Job:
        self.sched.submit_many(self.reqs)
        return self

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every row's events in arrival order; ends when all rows are done, or at the first error."""
        while not self.over:
            row, ev = await self.queue.get()
            if ev.kind == "done":
                self.open -= 1
            self.over = ev.kind == "error" or self.open == 0
            yield row, ev

    def cancel(self) -> None:
        """Free the slots of rows still waiting or running (a no-op once all are done)."""
        self.over = True
        for r in self.reqs:
            if not r.finished:
                self.sched.cancel(r)


class ClientGone(Exception):
    """The client closed a non-streaming request: nobody reads the answer (logged as 499)."""


def sampling_params(body, max_tokens: int, logprobs: int | None = None, group: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=getattr(body, "top_k", 0), min_p=getattr(body, "min_p", 0.0),
                          repetition_penalty=body.repetition_penalty, seed=body.seed,
                          stop=tuple(getattr(body, "stop", None) or ()), logprobs=logprobs, group=group)


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


def check_n(st: ServerState, n: int, prompts: int = 1) -> None:
    """n choices are n rows of one batch, so they must fit in one (a seed then reproduces all of them)."""
    if n > st.s.max_concurrent:
        raise ApiError(400, f"n {n} exceeds this server's limit of {st.s.max_concurrent} (its max_concurrent)", "n",
                       "unsupported_value")
    if n * prompts > st.s.max_concurrent + st.s.max_queue:
        raise ApiError(400, f"{prompts} prompts x n {n} = {n * prompts} generations; this server takes at most "
                            f"{st.s.max_concurrent + st.s.max_queue}", "n", "too_many_inputs")


async def start_job(request: Request, prompts: list[list[int]], body, param: str, max_param: str = "max_tokens",
                    requested: int | None = None, n: int = 1, logprobs: int | None = None) -> Job:
    """Check every prompt, then submit n rows per prompt (choice index = prompt * n + j) all at once."""
    st = state(request)
    limits = []
    for ids in prompts:
        st.check_prompt(len(ids), param)
        limits.append(st.resolve_max_tokens(requested if requested is not None else body.max_tokens, len(ids),
                                            max_param))
    group = next(GROUPS) if body.seed is not None else None
    rows = [(ids, sampling_params(body, m, logprobs, group)) for ids, m in zip(prompts, limits) for _ in range(n)]
    note(request, tokens_in=sum(map(len, prompts)))
    return Job(st.sched, rows).submit()


async def watch_disconnect(request: Request, job: Job) -> None:
    """Non-streaming requests: when the client goes away, free its slots at once."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            note(request, disconnected=True)
            job.cancel()
            job.queue.put_nowait((-1, Event("error", error=ClientGone())))
            return


@dataclass
class Choice:
    """One row's whole answer (non-streaming replies)."""

    text: str = ""
    finish_reason: str = "stop"
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect(request: Request, job: Job) -> list[Choice]:
    """Run a job's rows to completion -> one Choice per row; raises the first error."""
    watcher = asyncio.create_task(watch_disconnect(request, job))
    try:
        parts: list[list[str]] = [[] for _ in job.reqs]
        out = [Choice() for _ in job.reqs]
        async for row, ev in job.events():
            if ev.kind == "text":
                parts[row].append(ev.text)
                out[row].logprobs.extend(ev.logprobs or ())
            elif ev.kind == "done":
                out[row].finish_reason, out[row].tokens = ev.finish_reason or "stop", ev.completion_tokens
            elif isinstance(ev.error, ClientGone):  # nobody is listening; the log line says 499
                raise ApiError(499, "client closed the request", None, "client_closed")
            else:
                raise ev.error or RuntimeError("generation failed")
        for c, p in zip(out, parts):
            c.text = "".join(p)
        return out
    finally:
        watcher.cancel()
        job.cancel()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timings(job: Job, n_in: int) -> dict[str, Any]:
    """Speed figures next to `usage` (an lmforge extension; OpenAI clients ignore it).

    Times count from when the request reached the scheduler (after tokenization): the queue wait, the time to
    the first token (queue + prefill + one step), and the decode speed after the first token.
    """
    reqs = job.reqs
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


async def stream_job(request: Request, job: Job, n_in: int, head: dict, include_usage: bool,
                     text_chunk: Callable[[int, str, list[TokenLogprob] | None], str],
                     end_chunk: Callable[[int, str], str], first: list[str]) -> AsyncIterator[str]:
    """SSE pieces for a job's rows (chunks name their choice index); a client that goes away (the task is
    cancelled) frees its slots at once. With include_usage, a last chunk carries `usage` and no choices."""
    n_out = 0
    try:
        for f in first:
            yield f
        async for row, ev in job.events():
            if ev.kind == "text":
                if ev.text or ev.logprobs:
                    yield text_chunk(row, ev.text, ev.logprobs)
            elif ev.kind == "done":
                n_out += ev.completion_tokens
                yield end_chunk(row, ev.finish_reason or "stop")
            else:
                err = as_api_error(ev.error or RuntimeError("generation failed"))
                yield sse(err.body())
                return
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(n_in, n_out), "timings": timings(job, n_in)})
        yield "data: [DONE]\n\n"
    finally:
        if not job.over:
            note(request, disconnected=True)
        job.cancel()
        note(request, tokens_out=n_out or sum(r.completion_tokens for r in job.reqs))


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
                           "max_concurrent": st.s.max_concurrent, "max_queue": st.s.max_queue, **st.sched.stats,
                           "decode_step": st.sched.decode_step},  # what batch-1 steps ran last, and why
            "limits": {"max_tokens": st.s.max_tokens, "max_prompt_tokens": st.max_prompt, "context_length": st.ctx,
                       "max_body_bytes": st.s.max_body_bytes},
            "api_key_required": bool(st.s.api_key)}


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus text format (like /health, outside /v1/: no API key needed; see docs/serving.md)."""
    m = state(request).metrics
    return Response(m.render(), media_type=m.content_type)


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
def stream_head(body, head: dict, obj: str) -> tuple[dict, bool]:
    """The fields every chunk shares, and whether the stream ends with a usage chunk (then every other chunk
    says `usage: null`, as OpenAI's do)."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return {**head, "object": obj, **({"usage": None} if include_usage else {})}, include_usage


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = state(request)
    body: ChatRequest = await read_body(request, ChatRequest)
    st.check_model(body.model, st.gen_names, "chat completions")
    body.unsupported()
    check_n(st, body.n)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    st.check_max_tokens(requested, max_param)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name is not None else {})} for m in body.messages]
    ids = await st.chat_ids(messages)
    k = body.top_logprobs_k()
    job = await start_job(request, [ids], body, "messages", max_param, requested, n=body.n, logprobs=k)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": st.model_id,
            "system_fingerprint": "lmforge"}
    if body.stream:
        shead, include_usage = stream_head(body, head, "chat.completion.chunk")

        def chunk(i: int, delta: dict, finish: str | None = None, lps: list[TokenLogprob] | None = None) -> str:
            lp = st.logprobs.chat(lps) if k is not None and lps is not None else None
            return sse({**shead, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        pieces = stream_job(request, job, len(ids), shead, include_usage,
                            lambda i, t, lps: chunk(i, {"content": t}, lps=lps), lambda i, r: chunk(i, {}, r),
                            [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(request, job)
    n_out = sum(c.tokens for c in choices)
    note(request, tokens_out=n_out)
    return {**head, "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": st.logprobs.chat(c.logprobs) if k is not None else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": usage(len(ids), n_out), "timings": timings(job, len(ids))}


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
    if len(prompts) > st.s.max_concurrent + st.s.max_queue:
        raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most "
                            f"{st.s.max_concurrent + st.s.max_queue}", "prompt", "too_many_inputs")
    check_n(st, body.n, len(prompts))
    ids_list = []
    for p in prompts:
        if not p.strip():
            raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
        ids_list.append(await st.encode(p, True))
    k = body.top_logprobs_k()
    job = await start_job(request, ids_list, body, "prompt", n=body.n, logprobs=k)
    n_in = sum(map(len, ids_list))
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": st.model_id,
            "system_fingerprint": "lmforge"}
    if body.stream:
        shead, include_usage = stream_head(body, head, "text_completion")
        offsets = [0] * len(job.reqs)  # characters of each choice's text so far, for text_offset

        def chunk(i: int, text: str, lps: list[TokenLogprob] | None = None, finish: str | None = None) -> str:
            lp = None
            if k is not None and lps is not None:
                lp = st.logprobs.completion(lps, offsets[i])
                offsets[i] += sum(len(t) for t in lp["tokens"])
            return sse({**shead, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

        pieces = stream_job(request, job, n_in, shead, include_usage, chunk, lambda i, r: chunk(i, "", finish=r), [])
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(request, job)
    n_out = sum(c.tokens for c in choices)
    note(request, tokens_out=n_out)
    return {**head, "object": "text_completion",
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": st.logprobs.completion(c.logprobs) if k is not None else None}
                        for i, c in enumerate(choices)],
            "usage": usage(n_in, n_out), "timings": timings(job, n_in)}


# ---- task endpoints (zero-shot prompts through the chat template, as the CLI verbs do) -----------------------
async def run_task(request: Request, body: TaskRequest, prompt: str, default_new: int) -> tuple[str, str, dict]:
    """-> (text, finish_reason, {"usage", "timings"}) for one task prompt."""
    st = state(request)
    st.check_model(body.model, st.gen_names, "task endpoints")
    st.check_max_tokens(body.max_tokens)
    ids = await st.chat_ids([{"role": "user", "content": prompt}])
    requested = body.max_tokens if body.max_tokens is not None else min(default_new, st.s.max_tokens,
                                                                        max(1, st.ctx - len(ids)))
    job = await start_job(request, [ids], body, "text", requested=requested)
    [c] = await collect(request, job)
    note(request, tokens_out=c.tokens)
    return c.text.strip(), c.finish_reason, {"usage": usage(len(ids), c.tokens), "timings": timings(job, len(ids))}


@router.post("/v1/summarize")
async def summarize(request: Request):
    from lmforge.tasks.grounding import check
    from lmforge.tasks.prompts import summarize_prompt
    from lmforge.tasks.seq2seq import sentence_budget

    body: SummarizeRequest = await read_body(request, SummarizeRequest)
    sentences = sentence_budget(body.sentences, state(request).gen_path)  # a fine-tuned run dir: its trained budget
    text, reason, extra = await run_task(request, body, summarize_prompt(body.text, sentences), 160)
    return {"object": "summary", "model": state(request).model_id, "summary": text, "finish_reason": reason,
            "unsupported": check(body.text, text, "summarize"), **extra}  # invented numbers/amounts/names


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
    from lmforge.tasks.grounding import check
    from lmforge.tasks.prompts import answer_prompt

    body: AnswerRequest = await read_body(request, AnswerRequest)
    text, reason, extra = await run_task(request, body, answer_prompt(body.context, body.question), 64)
    return {"object": "answer", "model": state(request).model_id, "answer": text, "finish_reason": reason,
            "unsupported": check(body.context, text, "answer"), **extra}  # not in the context


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
