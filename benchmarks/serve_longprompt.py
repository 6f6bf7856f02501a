"""benchmarks/serve.py's long-prompt scenario: one long prompt arrives while streams run (issue 36 item 3).

`streams` streaming chat requests start together and run long (max_tokens `stream_tokens`); once every stream
has its first token and `delay_s` has passed, one request with a prompt of about `prompt_words` words (about as
many tokens: the count the server saw comes back in `usage`) arrives with max_tokens 8. Measured: the worst gap
between two consecutive content chunks of any stream while that prompt is prefilled (from its arrival to its
first token), the same per token (a chunk that carries a character split over two tokens spans two decode
steps: its interval counts as two gaps), the worst gap over the whole run, and the long request's time to first
token. A server that
prefills the prompt in one piece holds every stream for the whole prefill; one that prefills it in chunks between
decode steps holds them for about a chunk.

What the times are: a chunk's arrival is taken in this (the benchmark's) process when httpx hands over its
`data:` line, for all streams in one event loop, so a slow client would count its own lag as the server's. It
does not here: timed against the server's hand-over of each token, the arrivals lag by a small fraction of the
gaps, each of which was one prefill chunk plus one decode step on the server
(docs/serving.md, "Invariance and chunked prefill, measured").
"""

from __future__ import annotations

import asyncio

from benchmarks.common import stream_chat

WORDS = ("the river ran past the old mill where a girl kept bees and wrote down every storm she saw, while her "
         "brother mended nets and counted boats that came home late").split()


def long_text(words: int) -> str:
    """About `words` words of plain English (~1 token each), asking for a short summary at the end."""
    body = " ".join(WORDS[i % len(WORDS)] for i in range(max(1, words)))
    return f"{body}.\n\nSummarize the text above in one sentence."


def gaps_within(times: list[float], lo: float, hi: float) -> float:
    """The longest interval between consecutive chunk times that overlaps [lo, hi] (0 when none does)."""
    worst = 0.0
    for a, b in zip(times, times[1:]):
        if b >= lo and a <= hi:
            worst = max(worst, b - a)
    return worst


def token_gaps_within(times: list[float], ntok: list[int], lo: float, hi: float) -> float:
    """As gaps_within, per token: a chunk that carries n tokens (a character split over n tokens is sent whole,
    once its last token is decoded) counts its interval as n steps' gaps, (b - a) / n."""
    worst = 0.0
    for a, b, n in zip(times, times[1:], ntok[1:]):
        if b >= lo and a <= hi:
            worst = max(worst, (b - a) / max(1, n))
    return worst


async def _stream(ac, text: str, max_tokens: int, started: asyncio.Event | None = None) -> dict:
    """One streamed request: when it was sent, each content chunk's arrival and `usage` (started: set at the first)."""
    return await stream_chat(ac, text, max_tokens, on_first=None if started is None else started.set,
                             count_tokens=True)


async def long_prompt_run(url: str, streams: int, stream_tokens: int, prompt_words: int,
                          delay_s: float = 1.0) -> dict:
    """One run of the scenario against a server at `url` (see the module docstring)."""
    import httpx

    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as ac:
        await asyncio.gather(*(ac.get("/health") for _ in range(streams + 1)))
        started = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(_stream(ac, f"Tell a long story, number {i}.", stream_tokens, started[i]))
                 for i in range(streams)]
        await asyncio.gather(*(e.wait() for e in started))
        await asyncio.sleep(delay_s)
        long = await _stream(ac, long_text(prompt_words), 8)
        runs = await asyncio.gather(*tasks)
    bad = [r["error"] for r in [long, *runs] if "error" in r]
    if bad or not long["times"]:
        return {"error": bad[0] if bad else "the long request produced no text"}
    arrive, first = long["sent"], long["times"][0]
    return {"streams": streams, "prompt_tokens": long["usage"].get("prompt_tokens"),
            "long_ttft_s": first - arrive,
            "worst_gap_during_s": max(gaps_within(r["times"], arrive, first) for r in runs),
            "worst_gap_s": max(gaps_within(r["times"], -1e18, 1e18) for r in runs),
            "worst_token_gap_during_s": max(token_gaps_within(r["times"], r.get("ntok", []), arrive, first)
                                            for r in runs),
            "multi_token_chunks": sum(sum(n > 1 for n in r.get("ntok", [])) for r in runs),
            "stream_tokens": sum(r["usage"].get("completion_tokens", 0) for r in runs)}


COLUMNS = [("impl", "server"), ("streams", "streams"), ("prompt_tokens", "long prompt tokens"),
           ("long_ttft_s", "long TTFT s"), ("worst_gap_during_s", "worst gap during its prefill s"),
           ("worst_token_gap_during_s", "worst gap per token during it s"),
           ("multi_token_chunks", "chunks of 2+ tokens"),
           ("worst_gap_s", "worst gap overall s")]
