"""lmforge's task endpoints: /v1/summarize, /v1/translate and /v1/answer (zero-shot prompts through the chat
template, as the CLI verbs do, on the scheduler) and /v1/classify (the --classifier run, on the auxiliary
thread). Replies carry `usage` and `timings` as the OpenAI endpoints do.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from lmforge.errors import GenerationError
from lmforge.serve.adapters import AdapterError
from lmforge.serve.errors import ApiError
from lmforge.serve.routes_common import adapter_api_error, collect, note, read_body, start_job, state, timings, usage
from lmforge.serve.schemas import AnswerRequest, ClassifyRequest, SummarizeRequest, TaskRequest, TranslateRequest

router = APIRouter()


# ---- generation tasks -------------------------------------------------------------------------------------
async def run_task(request: Request, body: TaskRequest, prompt: str, default_new: int) -> tuple[str, str, dict]:
    """-> (text, finish_reason, {"usage", "timings"}) for one task prompt."""
    st = state(request)
    st.check_model(body.model, st.gen_names, "task endpoints")
    st.check_max_tokens(body.max_tokens)
    ids = await st.chat_ids([{"role": "user", "content": prompt}])
    requested = body.max_tokens if body.max_tokens is not None else min(default_new, st.settings.max_tokens,
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
    return {"object": "summary", "model": state(request).reply_model(body.model), "summary": text,
            "finish_reason": reason,
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
    return {"object": "translation", "model": state(request).reply_model(body.model), "translation": text,
            "to": body.to,
            "finish_reason": reason, **extra}


@router.post("/v1/answer")
async def answer(request: Request):
    from lmforge.tasks.grounding import check
    from lmforge.tasks.prompts import answer_prompt

    body: AnswerRequest = await read_body(request, AnswerRequest)
    text, reason, extra = await run_task(request, body, answer_prompt(body.context, body.question), 64)
    return {"object": "answer", "model": state(request).reply_model(body.model), "answer": text,
            "finish_reason": reason,
            "unsupported": check(body.context, text, "answer"), **extra}  # not in the context


# ---- classification (auxiliary thread) ---------------------------------------------------------------------
def count_tokens(tok, texts: list[str]) -> int:
    try:
        return sum(len(tok.encode(t)) for t in texts)
    except Exception:  # a tokenizer without encode (GloVe words): count words
        return sum(len(t.split()) for t in texts)


@router.post("/v1/classify")
async def classify(request: Request):
    st = state(request)
    body: ClassifyRequest = await read_body(request, ClassifyRequest)
    held = classifier_adapter(st, body.model)  # a classifier adapter over the served base, by name
    if held is None and st.classifier is None:
        raise ApiError(404, "no classifier is loaded (start the server with --classifier RUN_DIR, or load a "
                            "classifier adapter)", "model", "model_not_found")
    if held is None:
        st.check_model(body.model, st.cls_names, "classification")
    try:
        return await _classify(request, st, body, held.classifier if held else st.classifier,
                               held.name if held else st.cls_id)
    finally:
        if held is not None:
            st.adapters.release(held)


def classifier_adapter(st, requested: str | None):
    """The classify adapter `model` names (acquired: release it), or the only one when `model` is absent and no
    --classifier is served; None: use --classifier."""
    name = st.adapter_for(requested)
    if name is None:
        cls = [a.name for a in st.adapters.all() if a.kind == "classify" and not a.draining]
        if requested is not None or st.classifier is not None or len(cls) != 1:
            return None
        name = cls[0]
    try:
        return st.adapters.acquire(name, "classify")
    except AdapterError as e:
        raise adapter_api_error(e) from None


async def _classify(request: Request, st, body: ClassifyRequest, classifier, model_id: str):
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise ApiError(400, "'input' is an empty list", "input", "empty_input")
    if len(texts) > st.settings.max_inputs:
        raise ApiError(400, f"{len(texts)} inputs in one request; this server takes at most "
                            f"{st.settings.max_inputs}", "input", "too_many_inputs")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ApiError(400, f"input[{i}] is empty", "input", "empty_input")
        if len(t) > st.settings.max_body_bytes:
            raise ApiError(413, f"input[{i}] is too long", "input", "request_too_large")

    def work():
        from lmforge.tasks.classify import predict

        return count_tokens(classifier.tokenizer, texts), predict(classifier, texts)

    n_in, preds = await st.in_aux(work)
    note(request, tokens_in=n_in)
    return {"object": "list", "model": model_id, "data": [{"index": i, **p} for i, p in enumerate(preds)],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in}}
