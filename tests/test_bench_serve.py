"""benchmarks/serve.py's pure parts: the seeded workload every server gets, percentiles, ratios, issue 12's targets.

No server starts here: the end-to-end run is `python benchmarks/serve.py --clients 1,2 --requests 2
--max-tokens-range 8,16`.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks.serve import add_ratios, check_targets
from benchmarks.serve_load import _pct, prompt, workload


def test_workload_is_seeded_and_in_range():
    a = workload(16, 3, (16, 256), 2.0, seed=0)
    assert a == workload(16, 3, (16, 256), 2.0, seed=0)  # every server gets the same list
    assert a != workload(16, 3, (16, 256), 2.0, seed=1)
    assert len(a) == 16 and all(len(p.prompts) == len(p.max_tokens) == 3 for p in a)
    toks = [m for p in a for m in p.max_tokens]
    assert all(16 <= m <= 256 for m in toks) and len(set(toks)) > 10  # drawn, not one value
    assert all(0.0 <= p.delay_s <= 2.0 for p in a) and len({p.delay_s for p in a}) == 16  # staggered
    assert workload(1, 2, (8, 16), 2.0, seed=0)[0].delay_s == 0.0  # one client: no wait before the level


def test_prompts_are_distinct_at_the_largest_level():
    plans = workload(32, 4, (16, 256), 2.0, seed=0)
    texts = [t for p in plans for t in p.prompts]
    assert len(set(texts)) == 128
    assert prompt(0) != prompt(100) and prompt(100) != prompt(200)


def test_percentile_interpolates_unsorted_input():
    xs = [float(x) for x in range(100, 0, -1)]
    assert _pct(xs, 50) == pytest.approx(50.5)
    assert _pct(xs, 99) == pytest.approx(99.01)
    assert _pct([3.0], 99) == 3.0 and _pct([], 50) is None


def _row(impl: str, clients: int, tps: float, ttft99: float, texts: dict | None = None) -> dict:
    return {"impl": impl, "clients": clients, "tokens_per_s": tps, "ttft_p99_s": ttft99, "texts": texts or {}}


def test_ratios_and_same_text():
    rows = [_row("lmforge", 4, 120.0, 0.5, {"a": "x", "b": "y"}), _row("llama-server", 4, 100.0, 0.6),
            _row("llama-cpp-python", 4, 40.0, 3.0), _row("transformers", 4, 10.0, 9.0, {"a": "x", "b": "z"}),
            {"impl": "llama-server", "skipped": "no binary"}]
    add_ratios(rows)
    assert rows[0]["x_llama_server"] == pytest.approx(1.2)
    assert rows[0]["x_llama_cpp_python"] == pytest.approx(3.0)
    assert rows[0]["same_text"] == "1/2"
    assert rows[1]["x_llama_server"] == pytest.approx(1.0)


def test_targets_pass_and_fail_where_the_issue_says():
    rows = [_row("lmforge", 1, 85.0, 0.1), _row("llama-server", 1, 100.0, 0.1),
            _row("lmforge", 16, 110.0, 0.9), _row("llama-server", 16, 100.0, 0.5),
            _row("llama-cpp-python", 16, 50.0, 20.0)]

    def target(clients: int, words: str) -> dict:
        (t,) = [t for t in check_targets(rows) if t["clients"] == clients and words in t["target"]]
        return t

    assert len(check_targets(rows)) == 4  # three at 16 clients, one at 1
    assert target(1, "within 10%")["ratio"] == pytest.approx(0.85) and not target(1, "within 10%")["met"]
    assert target(16, "1.0x llama-server")["ratio"] == pytest.approx(1.1) and target(16, "1.0x llama-server")["met"]
    assert target(16, "first token")["ratio"] == pytest.approx(1.8) and not target(16, "first token")["met"]
    assert target(16, "llama-cpp-python")["ratio"] == pytest.approx(2.2) and target(16, "llama-cpp-python")["met"]
    rows[2]["ttft_p99_s"] = 0.4  # now ahead of llama-server's first token
    assert target(16, "first token")["met"]
    rows[0]["tokens_per_s"] = 95.0
    assert target(1, "within 10%")["met"]
    rows.append(_row("lmforge-plain", 16, 125.0, 0.5))  # invariance + chunked prefill off, the same run
    assert target(16, "cost <= 10%")["ratio"] == pytest.approx(0.88) and not target(16, "cost <= 10%")["met"]
    rows[-1]["tokens_per_s"] = 120.0
    assert target(16, "cost <= 10%")["met"]


def test_long_prompt_gaps_and_text():
    from benchmarks.serve_longprompt import gaps_within, long_text

    times = [0.0, 0.1, 0.2, 1.5, 1.6, 3.0]
    assert gaps_within(times, 0.15, 1.0) == pytest.approx(1.3)  # the gap that spans the window counts
    assert gaps_within(times, 1.55, 1.58) == pytest.approx(0.1)
    assert gaps_within(times, 5.0, 6.0) == 0.0 and gaps_within([1.0], 0.0, 2.0) == 0.0
    assert gaps_within(times, -1e18, 1e18) == pytest.approx(1.4)
    from benchmarks.serve_longprompt import token_gaps_within

    # per token: a chunk of 2 tokens (a character split over two) counts its interval as two steps
    assert token_gaps_within([0.0, 1.0, 3.0, 3.5], [1, 1, 2, 1], -1e18, 1e18) == pytest.approx(1.0)
    assert token_gaps_within([0.0, 1.0, 3.0, 3.5], [1, 1, 1, 1], -1e18, 1e18) == pytest.approx(2.0)
    assert token_gaps_within([0.0, 1.0, 3.0], [1, 1, 2], 2.5, 2.6) == pytest.approx(1.0)
    assert len(long_text(4000).split()) > 4000 and long_text(10) != long_text(11)


def _sse(*pieces: str) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"choices": [], "usage": {"completion_tokens": len(pieces)}})
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_a_stale_connection_is_retried_once_and_other_failures_are_recorded():
    import httpx

    from benchmarks.serve_load import one_request

    calls = []

    def handler(script):
        def h(request):
            calls.append(request.url.path)
            step = script[min(len(calls), len(script)) - 1]
            if isinstance(step, Exception):
                raise step
            return httpx.Response(200, content=step, headers={"content-type": "text/event-stream"})
        return h

    async def go(script):
        calls.clear()
        async with httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(handler(script))) as ac:
            return await one_request(ac, "hi", 8)

    stale = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    r = asyncio.run(go([stale, _sse("a", "b")]))  # closed keep-alive connection, then a fresh one answers
    assert r["text"] == "ab" and r["completion_tokens"] == 2 and len(calls) == 2
    r = asyncio.run(go([stale, stale]))  # twice: recorded, not raised
    assert r["error"].startswith("RemoteProtocolError") and len(calls) == 2
    r = asyncio.run(go([httpx.ReadTimeout("slow")]))  # not a stale connection: no retry
    assert r["error"].startswith("ReadTimeout") and len(calls) == 1


def test_stream_chat_parses_the_chunks_every_serving_benchmark_reads():
    """The one SSE client of serve.py, serve_longprompt.py and serve_adapters.py: body, chunk times, text, counts."""
    import httpx

    from benchmarks.common import stream_chat

    bodies, firsts = [], []

    async def go(content: bytes, status: int = 200, **kw) -> dict:
        def h(request):
            bodies.append(json.loads(request.content))
            return httpx.Response(status, content=content, headers={"content-type": "text/event-stream"})

        async with httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(h)) as ac:
            return await stream_chat(ac, "hi", 8, **kw)

    r = asyncio.run(go(_sse("a", "", "b", "c"), model="adapter1", on_first=lambda: firsts.append(1)))
    assert bodies[-1]["model"] == "adapter1" and bodies[-1]["stream"] and bodies[-1]["temperature"] == 0
    assert bodies[-1]["max_tokens"] == 8 and bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]
    assert r["text"] == "abc" and len(r["times"]) == 3 and firsts == [1]  # the empty piece is no content chunk
    assert r["completion_tokens"] == 4 and r["tokens_from"] == "usage" and r["usage"] == {"completion_tokens": 4}
    assert r["ttft_s"] == pytest.approx(r["times"][0] - r["sent"]) and r["sent"] <= r["times"][0] <= r["end"]
    assert r["latency_s"] == pytest.approx(r["end"] - r["sent"])
    no_usage = b"".join(b"data: " + json.dumps({"choices": [{"delta": {"content": p}, "finish_reason": f}]}).encode()
                        + b"\n\n" for p, f in (("x", None), ("y", "length"))) + b"data: [DONE]\n\n"
    r = asyncio.run(go(no_usage))
    assert "model" not in bodies[-1] and r["completion_tokens"] == 2 and r["tokens_from"] == "chunks"
    assert r["finish_reason"] == "length" and r["usage"] == {}
    r = asyncio.run(go(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: {"error": {"message": "boom"}}\n\n'))
    assert r == {"error": "{'message': 'boom'}"}
    assert asyncio.run(go(b"busy", status=429))["error"].startswith("HTTP 429")
    r = asyncio.run(go(b"data: [DONE]\n\n"))  # no content at all: TTFT is the whole request
    assert r["times"] == [] and r["ttft_s"] == pytest.approx(r["latency_s"])


def test_long_prompt_scenario_runs_against_a_server(gen):
    """The scenario end to end on a tiny in-thread server: every field comes back and is consistent."""
    pytest.importorskip("fastapi")
    from test_serve import start_server

    from benchmarks.serve_longprompt import long_prompt_run

    srv = start_server(gen, settings={"max_tokens": 64, "prefill_chunk": 16})
    try:
        r = asyncio.run(long_prompt_run(srv.url, streams=2, stream_tokens=30, prompt_words=6, delay_s=0.05))
    finally:
        srv.stop()
    assert "error" not in r, r
    assert r["streams"] == 2 and r["prompt_tokens"] > 6 and r["long_ttft_s"] > 0
    assert 0 <= r["worst_gap_during_s"] <= r["worst_gap_s"] and r["stream_tokens"] > 0
    assert 0 <= r["worst_token_gap_during_s"] <= r["worst_gap_during_s"] and r["multi_token_chunks"] >= 0
