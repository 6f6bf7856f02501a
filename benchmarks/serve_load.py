"""benchmarks/serve.py's load: the seeded workload every server gets (prompts, arrivals, max_tokens) and the
clients that send it, one streamed chat request after another, and sum up a level.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from benchmarks.common import load_average, stream_chat

# ---- workload ----------------------------------------------------------------------------------------------
TOPICS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat who runs a bakery",
          "the first day on Mars", "a dragon afraid of heights", "a detective in a tiny village",
          "a violin found in an attic", "two friends lost in a forest", "a train that never stops",
          "a garden on the moon", "a clock that runs backwards", "a whale who sings opera",
          "a library with no books", "a boy who talks to birds", "an old map and a treasure",
          "a snowman in summer", "a chef who cannot taste", "a river that flows uphill",
          "a kite that flies at night", "a bridge between two islands"]
STYLES = ["a long", "a long, funny", "a long, sad", "a long, mysterious", "a long, exciting"]


def prompt(i: int) -> str:
    """The i-th distinct prompt; it asks for a long text so that few requests stop at EOS before max_tokens."""
    style, topic = STYLES[(i // len(TOPICS)) % len(STYLES)], TOPICS[i % len(TOPICS)]
    part = f" (part {i // (len(TOPICS) * len(STYLES)) + 1})" if i >= len(TOPICS) * len(STYLES) else ""
    return f"Write {style} story about {topic}{part}, with many chapters and as much detail as you can."


@dataclass(frozen=True)
class ClientPlan:
    """One client of a level: when it arrives and what it asks for (the same for every server)."""

    delay_s: float  # before its first request; the rest follow back to back
    prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]


def workload(clients: int, requests: int, tokens: tuple[int, int], stagger_s: float, seed: int) -> list[ClientPlan]:
    """Seeded by (seed, clients) only: every server, and every run with the same flags, gets the same plans."""
    rng = random.Random(seed * 1_000_003 + clients)
    plans = []
    for k in range(clients):
        delay = rng.uniform(0.0, stagger_s) if clients > 1 else 0.0
        ids = range(k * requests, (k + 1) * requests)
        plans.append(ClientPlan(delay, tuple(prompt(i) for i in ids),
                                tuple(rng.randint(tokens[0], tokens[1]) for _ in ids)))
    return plans


# ---- load generator (parent) ------------------------------------------------------------------------------
async def one_request(ac, text: str, max_tokens: int) -> dict:
    """One streamed request. A connection the server closed before answering (a keep-alive connection it timed
    out, as llama-server's HTTP library does after 5 s idle) is retried once on a fresh one; any other transport
    failure is recorded as this request's error, not raised, so one bad request cannot lose a level's results."""
    import httpx

    for attempt in (0, 1):
        try:
            r = await stream_chat(ac, text, max_tokens)
            return r if "error" in r else {**r, "max_tokens": max_tokens, "prompt": text}
        except (httpx.RemoteProtocolError, httpx.ConnectError) as e:
            stale = isinstance(e, httpx.ConnectError) or "without sending a response" in str(e)
            if attempt or not stale:
                return {"error": f"{type(e).__name__}: {e}"}
        except httpx.HTTPError as e:
            return {"error": f"{type(e).__name__}: {e}"}
    raise AssertionError("unreachable")


async def run_level(url: str, plans: list[ClientPlan], ping: str = "/health") -> dict:
    """One level against the server at `url`: every client's plan; tokens/s, latency and TTFT percentiles, texts."""
    import httpx

    n = len(plans)
    # idle connections expire before llama-server's 5 s keep-alive timeout closes them under us
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2, keepalive_expiry=3.0)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as ac:
        async def client(plan: ClientPlan) -> list[dict]:
            await asyncio.sleep(plan.delay_s)
            return [await one_request(ac, p, m) for p, m in zip(plan.prompts, plan.max_tokens)]

        # open every client's connection first, so the level measures the server, not TCP connects
        await asyncio.gather(*(ac.get(ping) for _ in range(n)))
        per_client = await asyncio.gather(*(client(p) for p in plans))
    res = [r for rs in per_client for r in rs]
    ok = [r for r in res if "error" not in r]
    wall = max(r["end"] for r in ok) - min(r["sent"] for r in ok) if ok else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"clients": n, "requests": len(res), "errors": len(res) - len(ok), "wall_s": wall,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "at_max": f"{sum(r['completion_tokens'] >= r['max_tokens'] for r in ok)}/{len(ok)}",
            "p50_s": _pct([r["latency_s"] for r in ok], 50), "p99_s": _pct([r["latency_s"] for r in ok], 99),
            "ttft_p50_s": _pct([r["ttft_s"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft_s"] for r in ok], 99),
            "tokens_from": sorted({r["tokens_from"] for r in ok}),
            "texts": {r["prompt"]: r["text"] for r in ok}, "load_average": load_average(),
            "first_error": next((r["error"] for r in res if "error" in r), None)}


def _pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

