"""What the OpenAI and task handlers share: reading a body, running one request's rows through the
scheduler (Job), and turning their events into a JSON reply or server-sent events.

Generation goes through `batching.Scheduler` (one worker thread, batched); the event loop only parses,
validates and streams.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lmforge.serve.adapters import AdapterError
from lmforge.serve.batching import Scheduler
from lmforge.serve.errors import ApiError, as_api_error
from lmforge.serve.requests import Event, GenRequest, SamplingParams, TokenLogprob
from lmforge.serve.schemas import parse_request

if TYPE_CHECKING:
    from lmforge.serve.state import ServerState

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state(request: Request) -> ServerState:
    return request.app.state.lmforge


# ---- one generation request (its n choices, or its prompts), seen from the event loop ------------------------
GROUPS = itertools.count(1)  # seeded requests: their rows share a group and run as one batch of their own


class Job:
    """Bridges a request's scheduler rows (worker thread) to one asyncio queue of (row, Event)."""

    def __init__(self, sched: Scheduler, rows: list[tuple[list[int], SamplingParams]],
                 on_end: Callable[[int], None] | None = None) -> None:
        """on_end(row): called once per row when it ends (done, error, or cancelled): frees its adapter."""
        self.sched, self.loop = sched, asyncio.get_running_loop()
        self.on_end = on_end
        self._ended = [False] * len(rows)
        self._end_lock = threading.Lock()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.reqs = [GenRequest(ids, params, functools.partial(self.emit, i)) for i, (ids, params) in enumerate(rows)]
        self.open = len(self.reqs)  # rows not done yet
        self.over = False

    def emit(self, row: int, ev: Event) -> None:
        if ev.kind != "text":
            self.end(row)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, ev))

    def end(self, row: int) -> None:
        if self.on_end is None:
            return
        with self._end_lock:
            if self._ended[row]:
                return
            self._ended[row] = True
        self.on_end(row)

    def submit(self) -> Job:
        try:
            self.sched.submit_many(self.reqs)
        except BaseException:
            for i in range(len(self.reqs)):  # none was admitted
                self.end(i)
            raise
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
        for i, r in enumerate(self.reqs):
            if not r.finished:
                self.sched.cancel(r)
            self.end(i)


class ClientGone(Exception):
    """The client closed a non-streaming request: nobody reads the answer (logged as 499)."""


def sampling_params(body, max_tokens: int, logprobs: int | None = None, group: int | None = None,
                    stop_logprob: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=getattr(body, "top_k", 0), min_p=getattr(body, "min_p", 0.0),
                          repetition_penalty=body.repetition_penalty, seed=body.seed,
                          stop=tuple(getattr(body, "stop", None) or ()), logprobs=logprobs, group=group,
                          stop_logprob=stop_logprob, speculative=getattr(body, "speculative", "auto"))


async def compile_constraint(st: ServerState, kind: str, spec: Any, param: str):
    """(kind, spec) -> a Constraint compiled for the served tokenizer (cached; off the event loop: the first
    one builds the library's vocabulary), or a 400 naming `param` and the construct the library refused."""
    from lmforge.decoding.constraints import ConstraintError

    try:
        return await asyncio.to_thread(lambda: st.generator.constraints.compile(kind, spec))
    except ConstraintError as e:
        raise ApiError(400, f"'{param}' cannot be used: {e}", param, "invalid_value") from None


async def response_constraint(st: ServerState, body) -> Any:
    """The request's response_format as a compiled Constraint (None: free text)."""
    rf = getattr(body, "response_format", None)
    picked = rf.constraint() if rf is not None else None
    if picked is None:
        return None
    return await compile_constraint(st, *picked, "response_format")


def note(request: Request, **kw) -> None:
    """Fill in the request's log line (tokens in/out) for the middleware."""
    info = request.scope.get("state", {}).get("lmforge_log")
    if info is not None:
        info.update(kw)


async def read_body(request: Request, model: type):
    """Read the body (bounded by max_body_bytes while reading, for bodies without Content-Length), then parse."""
    limit = state(request).settings.max_body_bytes
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body is larger than this server's limit of {limit} bytes", None,
                           "request_too_large")
    return parse_request(bytes(raw), model)


def check_n(st: ServerState, n: int, prompts: int = 1) -> None:
    """n choices are n rows of one batch, so they must fit in one (a seed then reproduces all of them)."""
    cfg = st.settings
    if n > cfg.max_concurrent:
        raise ApiError(400, f"n {n} exceeds this server's limit of {cfg.max_concurrent} (its max_concurrent)",
                       "n", "unsupported_value")
    if n * prompts > cfg.max_concurrent + cfg.max_queue:
        raise ApiError(400, f"{prompts} prompts x n {n} = {n * prompts} generations; this server takes at most "
                            f"{cfg.max_concurrent + cfg.max_queue}", "n", "too_many_inputs")


async def start_job(request: Request, prompts: list[list[int]], body, param: str, max_param: str = "max_tokens",
                    requested: int | None = None, n: int = 1, logprobs: int | None = None,
                    stop_logprob: bool = False, constraint=None) -> Job:
    """Check every prompt, then submit n rows per prompt (choice index = prompt * n + j) all at once.
    stop_logprob: logprobs also for an EOS that ends a row (echo lists it, as OpenAI does). constraint: a compiled
    decoding.constraints.Constraint every row's text follows (response_format, tool_choice), or None."""
    st = state(request)
    limits = []
    for ids in prompts:
        st.check_prompt(len(ids), param)
        limits.append(st.resolve_max_tokens(requested if requested is not None else body.max_tokens, len(ids),
                                            max_param))
    group = next(GROUPS) if body.seed is not None else None
    rows = [(ids, sampling_params(body, m, logprobs, group, stop_logprob)) for ids, m in zip(prompts, limits)
            for _ in range(n)]
    if constraint is not None:
        rows = [(ids, replace(p, constraint=constraint)) for ids, p in rows]
    note(request, tokens_in=sum(map(len, prompts)))
    name = st.adapter_for(getattr(body, "model", None))
    if name is None:
        return Job(st.sched, rows).submit()
    held = []  # the adapter of each row, counted until the row ends (an unload lets them finish)
    try:
        for _ in rows:
            held.append(st.adapters.acquire(name))
    except AdapterError as e:
        for a in held:
            st.adapters.release(a)
        raise adapter_api_error(e) from None
    rows = [(ids, replace(p, adapter=held[0].ref)) for ids, p in rows]
    return Job(st.sched, rows, lambda i: st.adapters.release(held[i])).submit()


def adapter_api_error(e: AdapterError) -> ApiError:
    """An adapter refusal in OpenAI's shape, with the status the manager chose (400, 404, 409)."""
    code = {404: "model_not_found", 409: "adapter_conflict"}.get(e.status, "invalid_adapter")
    return ApiError(e.status, str(e), "model" if e.status == 404 else "path", code)


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
