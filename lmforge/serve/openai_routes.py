"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models and /v1/embeddings.

Module-level handlers that read the server's state from `request.app.state.lmforge` (a ServerState).
Embeddings run on the auxiliary thread, generation on the scheduler's.
"""

from __future__ import annotations

import base64
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lmforge.serve import echo, tool_stream, tools
from lmforge.serve.echo import EchoLogprobs
from lmforge.serve.errors import ApiError
from lmforge.serve.requests import TokenLogprob
from lmforge.serve.routes_common import (
    SSE_HEADERS,
    check_n,
    collect,
    compile_constraint,
    note,
    read_body,
    response_constraint,
    sse,
    start_job,
    state,
    stream_job,
    timings,
    usage,
)
from lmforge.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest

router = APIRouter()


# ---- models -----------------------------------------------------------------------------------------------
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
    template = getattr(st.generator.tokenizer, "chat_template", None)
    messages, native = tools.prompt_messages(body.messages, template, body.tool_list())
    ids = await tools.chat_ids(st.generator, messages, body.tool_list() if native else None)
    plan = tools.ToolPlan.of(body, template)  # None: no tools offered
    k = body.top_logprobs_k()
    constraint = await response_constraint(st, body)
    if plan is not None and plan.forced is not None:  # tool_choice required / named: JSON of the calls
        constraint = await compile_constraint(st, "json_schema", plan.forced, "tool_choice")
    job = await start_job(request, [ids], body, "messages", max_param, requested, n=body.n, logprobs=k,
                          constraint=constraint)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": st.reply_model(body.model),
            "system_fingerprint": "lmforge"}
    if body.stream:
        shead, include_usage = stream_head(body, head, "chat.completion.chunk")

        def chunk(i: int, delta: dict, finish: str | None = None, lps: list[TokenLogprob] | None = None) -> str:
            lp = st.logprobs.chat(lps) if k is not None and lps is not None else None
            return sse({**shead, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        text_chunk, end_chunk = lambda i, t, lps: chunk(i, {"content": t}, lps=lps), lambda i, r: chunk(i, {}, r)
        if plan is not None:
            text_chunk, end_chunk = tool_chunks(plan, body.n, chunk)
        pieces = stream_job(request, job, len(ids), shead, include_usage, text_chunk, end_chunk,
                            [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(request, job)
    n_out = sum(c.tokens for c in choices)
    note(request, tokens_out=n_out)

    def message(c) -> tuple[dict, str]:
        content, calls = plan.reply(c.text) if plan is not None else (c.text, [])
        if not calls:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": [x.openai() for x in calls]}, "tool_calls"

    replies = [message(c) for c in choices]
    return {**head, "object": "chat.completion",
            "choices": [{"index": i, "message": m, "logprobs": st.logprobs.chat(c.logprobs) if k is not None else None,
                         "finish_reason": why} for i, (c, (m, why)) in enumerate(zip(choices, replies))],
            "usage": usage(len(ids), n_out), "timings": timings(job, len(ids))}


def tool_chunks(plan: tools.ToolPlan, n: int, chunk):
    """Streamed replies with tools: content deltas until the text may be a tool call, then the calls as OpenAI's
    deltas, arguments as they are generated (serve/tool_stream.py), and finish_reason "tool_calls"."""
    return tool_stream.stream_chunks(plan, n, chunk)


@router.post("/v1/completions")
async def completions(request: Request):
    st = state(request)
    body: CompletionRequest = await read_body(request, CompletionRequest)
    st.check_model(body.model, st.gen_names, "completions")
    body.unsupported()
    if body.suffix:
        raise ApiError(400, "suffix is not supported", "suffix", "unsupported_value")
    st.check_max_tokens(body.max_tokens)
    prompts = body.prompts()
    if not prompts:
        raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
    most = st.settings.max_concurrent + st.settings.max_queue
    if len(prompts) > most:
        raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most {most}", "prompt",
                       "too_many_inputs")
    check_n(st, body.n, len(prompts))
    ids_list = [await prompt_ids(st, p) for p in prompts]
    k = body.top_logprobs_k()
    constraint = await response_constraint(st, body)
    n_in = sum(map(len, ids_list))
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": st.reply_model(body.model),
            "system_fingerprint": "lmforge"}
    echoed: list[str] = [""] * (len(prompts) * body.n)  # text in front of each choice's completion
    echo_lps: list[EchoLogprobs | None] = [None] * len(echoed)
    if body.echo:  # the prompts' own log-probabilities, scored on the worker thread before generating
        for ids in ids_list:
            st.check_prompt(len(ids), "prompt")
        scored = await echo.score(request, st, ids_list, k or 0) if k is not None else [[] for _ in ids_list]
        for i in range(len(echoed)):
            p, ids = prompts[i // body.n], ids_list[i // body.n]
            echoed[i] = p if isinstance(p, str) else st.generator.tokenizer.decode(ids)
            echo_lps[i] = EchoLogprobs(st, ids, scored[i // body.n]) if k is not None else None
        if body.max_tokens == 0:
            note(request, tokens_in=n_in, tokens_out=0)
            return {**head, "object": "text_completion",
                    "choices": [{"index": i, "text": t, "finish_reason": "length",
                                 "logprobs": e.out if e is not None else None}
                                for i, (t, e) in enumerate(zip(echoed, echo_lps))],
                    "usage": usage(n_in, 0)}
    job = await start_job(request, ids_list, body, "prompt", n=body.n, logprobs=k, stop_logprob=body.echo,
                          constraint=constraint)
    if body.stream:
        shead, include_usage = stream_head(body, head, "text_completion")
        offsets = [0] * len(job.reqs)  # characters of each choice's text so far, for text_offset

        def chunk(i: int, text: str, lps: list[TokenLogprob] | None = None, finish: str | None = None) -> str:
            lp = None
            if k is not None and lps is not None:
                if echo_lps[i] is not None:
                    lp = echo_lps[i].extend(lps)
                else:
                    lp = st.logprobs.completion(lps, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
            return sse({**shead, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

        first = [sse({**shead, "choices": [{"index": i, "text": t, "finish_reason": None,
                                            "logprobs": e.out if e is not None else None}]})
                 for i, (t, e) in enumerate(zip(echoed, echo_lps)) if body.echo]
        pieces = stream_job(request, job, n_in, shead, include_usage, chunk, lambda i, r: chunk(i, "", finish=r),
                            first)
        return StreamingResponse(pieces, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(request, job)
    n_out = sum(c.tokens for c in choices)
    note(request, tokens_out=n_out)

    def logprobs_of(i: int, c) -> dict | None:
        if k is None:
            return None
        e = echo_lps[i]
        if e is None:
            return st.logprobs.completion(c.logprobs)
        e.extend(c.logprobs)
        return e.out

    return {**head, "object": "text_completion",
            "choices": [{"index": i, "text": echoed[i] + c.text, "finish_reason": c.finish_reason,
                         "logprobs": logprobs_of(i, c)} for i, c in enumerate(choices)],
            "usage": usage(n_in, n_out), "timings": timings(job, n_in)}


async def prompt_ids(st, p: str | list[int]) -> list[int]:
    """One prompt -> token ids: text is encoded (with the tokenizer's BOS), ids are checked against the vocabulary."""
    if isinstance(p, str):
        if not p.strip():
            raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
        return await st.encode(p, True)
    if not p:
        raise ApiError(400, "'prompt' is empty: give some text", "prompt", "empty_prompt")
    vocab = st.generator.model.cfg.vocab_size
    bad = next((t for t in p if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"'prompt' has token id {bad}, outside this model's vocabulary (0..{vocab - 1})",
                       "prompt", "invalid_value")
    return list(p)


# ---- embeddings (auxiliary thread) ------------------------------------------------------------------------
@router.post("/v1/embeddings")
async def embeddings(request: Request):
    st = state(request)
    body: EmbeddingRequest = await read_body(request, EmbeddingRequest)
    st.check_model(body.model, st.emb_names, "embeddings")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a string or a non-empty list of strings (token ids are not "
                            "supported)", "input", "invalid_value")
    if len(texts) > st.settings.max_inputs:
        raise ApiError(400, f"{len(texts)} inputs in one request; this server takes at most "
                            f"{st.settings.max_inputs}", "input", "too_many_inputs")
    source = st.embedder if st.embedder is not None else st.generator  # no embedder: the generator's own model
    model, tok = source.model, source.tokenizer
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
