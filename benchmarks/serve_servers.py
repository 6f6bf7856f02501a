"""benchmarks/serve.py's Python servers, run in their own processes (`python benchmarks/serve.py --server NAME`):
lmforge (plain: batch invariance and chunked prefill off), and a minimal transformers generate loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


def serve_lmforge(a: argparse.Namespace) -> None:
    import uvicorn

    from lmforge.generator import Generator
    from lmforge.serve import ServeSettings, create_app

    gen = Generator.load(a.model)
    plain = a.server == "lmforge-plain"  # invariance and chunked prefill off: the "before" of their cost
    settings = ServeSettings(model_name=a.model, max_concurrent=a.max_concurrent, max_queue=256,
                             max_tokens=max(a.max_tokens_range[1], 1024), batch_invariant=not plain,
                             prefill_chunk=0 if plain else a.prefill_chunk)
    uvicorn.run(create_app(gen, settings=settings), host="127.0.0.1", port=a.port, log_level="warning",
                access_log=False)


def serve_transformers(a: argparse.Namespace) -> None:
    import threading
    import uuid

    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from lmforge.checkpoints import resolve

    path, _ = resolve(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    lock = threading.Lock()  # one generate at a time: a plain loop, no batching
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def chat(request):  # a plain Starlette route: the Request comes in as the argument
        body = await request.json()
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:
            with lock, torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=int(body.get("max_tokens", 32)), do_sample=False,
                                     streamer=streamer, pad_token_id=tok.eos_token_id)
            result["n"] = out.shape[1] - enc["input_ids"].shape[1]

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": a.model}

        def chunk(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta,
                                                               "finish_reason": finish}]}) + "\n\n"

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            it = iter(streamer)
            while (piece := await asyncio.to_thread(next, it, None)) is not None:
                if piece:
                    yield chunk({"content": piece})
            await asyncio.to_thread(worker.join)
            n = result.get("n", 0)
            yield chunk({}, "length" if n >= int(body.get("max_tokens", 32)) else "stop")
            usage = {"prompt_tokens": enc["input_ids"].shape[1], "completion_tokens": n,
                     "total_tokens": enc["input_ids"].shape[1] + n}
            yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
