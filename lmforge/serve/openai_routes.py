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

from lmforge.serve.batching import TokenLogprob
from lmforge.serve.errors import ApiError
from lmforge.serve.routes_common import (
    SSE_HEADERS,
    check_n,
    collect,
    note,
    read_body,
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
    most = st.settings.max_concurrent + st.settings.max_queue
    if len(prompts) > most:
        raise ApiError(400, f"{len(prompts)} prompts in one request; this server takes at most {most}", "prompt",
                       "too_many_inputs")
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
