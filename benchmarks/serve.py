"""Serving throughput and latency: `lmforge serve` vs a transformers generate loop behind the same HTTP shape.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--clients 1,4,16] [--max-tokens 32]
                               [--rounds 2] [--threads 1] [--impls lmforge,transformers]
                               [--out benchmarks/results/serve.json]

Each server runs in its own subprocess on a loopback port; the parent is the load generator: C concurrent
clients (asyncio + httpx) each send `rounds` streaming chat requests one after another (greedy, max_tokens
new tokens, the same distinct prompts for both servers). Per level we report completion tokens/s over the
wall time of the level, p50/p99 request latency (sent -> [DONE]) and p50 time to first token. One untimed
warm-up request goes first. p99 over few samples is close to the max: read it as "worst case seen".

The two servers:
  lmforge       lmforge.serve.create_app: requests are batched (left-padded) through one worker thread.
  transformers  a minimal FastAPI app in this file: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)
                (the same GGUF, dequantized to float32), model.generate + TextIteratorStreamer, one request at
                a time (a lock): what a plain generate loop behind an HTTP endpoint does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, format_table, load_average, machine_info, thread_env, write_json

IMPLS = ("lmforge", "transformers")
TOPICS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat who runs a bakery",
          "the first day on Mars", "a dragon afraid of heights", "a detective in a tiny village",
          "a violin found in an attic", "two friends lost in a forest", "a train that never stops",
          "a garden on the moon", "a clock that runs backwards", "a whale who sings opera",
          "a library with no books", "a boy who talks to birds", "an old map and a treasure",
          "a snowman in summer", "a chef who cannot taste", "a river that flows uphill",
          "a kite that flies at night", "a bridge between two islands"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


# ---- servers (subprocess side) ----------------------------------------------------------------------------
def serve_lmforge(a: argparse.Namespace) -> None:
    import uvicorn

    from lmforge.generate import Generator
    from lmforge.serve import ServeSettings, create_app

    gen = Generator.load(a.model)
    settings = ServeSettings(model_name=a.model, max_concurrent=a.max_concurrent, max_queue=256,
                             max_tokens=max(a.max_tokens, 64))
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


# ---- load generator (parent) ------------------------------------------------------------------------------
async def one_request(ac, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"latency_s": end - t0, "ttft_s": (first or end) - t0, "text": "".join(text),
            "completion_tokens": (usage or {}).get("completion_tokens", 0), "prompt": prompt}


async def run_level(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    ps = prompts(clients * rounds)
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as ac:
        async def client(k: int) -> list[dict]:
            return [await one_request(ac, ps[k * rounds + r], max_tokens) for r in range(rounds)]

        # open every client's connection first, so the level measures the server, not TCP connects
        await asyncio.gather(*(ac.get("/health") for _ in range(clients)))
        before = (await ac.get("/health")).json().get("generation", {})
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
        after = (await ac.get("/health")).json().get("generation", {})
    batches = after.get("batches", 0) - before.get("batches", 0)  # lmforge only: how requests were batched
    mean_batch = (after.get("rows", 0) - before.get("rows", 0)) / batches if batches else None
    res = [r for rs in per_client for r in rs]
    ok = [r for r in res if "error" not in r]
    lat = sorted(r["latency_s"] for r in ok)
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"clients": clients, "requests": len(res), "errors": len(res) - len(ok), "wall_s": wall,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
            "ttft_p50_s": _pct(sorted(r["ttft_s"] for r in ok), 50),
            "batches": batches or None, "mean_batch": mean_batch,
            "texts": {r["prompt"]: r["text"] for r in ok}, "load_average": load_average(),
            "first_error": next((r["error"] for r in res if "error" in r), None)}


def _pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of sorted xs."""
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_impl(impl: str, a: argparse.Namespace, log_dir: Path) -> list[dict]:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{impl}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--server", impl, "--model", a.model, "--port", str(port),
           "--max-tokens", str(a.max_tokens), "--max-concurrent", str(max(a.clients))]
    print(f"  starting the {impl} server ...", file=sys.stderr, flush=True)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=thread_env(a.threads), cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{impl} server exited ({proc.returncode}): "
                                   + " | ".join(log_path.read_text().strip().splitlines()[-5:]))
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > a.start_timeout:
                raise RuntimeError(f"{impl} server did not answer /health within {a.start_timeout}s")
            time.sleep(0.5)
        load_s = time.monotonic() - t0
        asyncio.run(run_level(url, 1, 1, a.max_tokens))  # warm-up, untimed
        rows = []
        for c in a.clients:
            print(f"  {impl}: {c} concurrent client(s) x {a.rounds} request(s) ...", file=sys.stderr, flush=True)
            r = asyncio.run(run_level(url, c, a.rounds, a.max_tokens))
            rows.append({"impl": impl, "startup_s": load_s, **r})
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


COLUMNS = [("clients", "clients"), ("impl", "server"), ("requests", "requests"), ("tokens_per_s", "tokens/s"),
           ("speedup", "vs transformers"), ("p50_s", "p50 latency s"), ("p99_s", "p99 latency s"),
           ("ttft_p50_s", "p50 first token s"), ("mean_batch", "mean batch"), ("same_text", "same text")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--out", default=str(RESULTS_DIR / "serve.json"))
    # server-only
    p.add_argument("--server", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-concurrent", type=int, default=16, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.clients = [int(c) for c in str(a.clients).split(",") if c.strip()]
    if a.server:
        from benchmarks.common import set_threads

        set_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        (serve_lmforge if a.server == "lmforge" else serve_transformers)(a)
        return 0

    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    started = time.time()
    machine = machine_info()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as tmp:
        for impl in impls:
            try:
                rows += bench_impl(impl, a, Path(tmp))
            except RuntimeError as e:
                print(f"{impl}: FAILED: {e}", file=sys.stderr)
                rows.append({"impl": impl, "error": str(e)})
    ref = {r["clients"]: r for r in rows if r.get("impl") == "transformers" and "error" not in r}
    for r in rows:
        base = ref.get(r.get("clients"))
        if base and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            shared = [k for k in r["texts"] if k in base["texts"]]
            r["same_text"] = f"{sum(r['texts'][k] == base['texts'][k] for k in shared)}/{len(shared)}"
    table = sorted([r for r in rows if "error" not in r], key=lambda r: (r["clients"], r["impl"]))
    print(format_table(table, COLUMNS))
    machine["load_average_end"] = load_average()
    payload = {"benchmark": "serve", "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "model": a.model,
               "max_tokens": a.max_tokens, "rounds": a.rounds, "threads": a.threads, "machine": machine,
               "results": rows}
    print(f"wrote {write_json(a.out, payload)}")
    return 0 if all("error" not in r and not r.get("errors") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
