"""The prefill chunk schedule (lmforge/serve/chunks.py): chunks shrink as the context grows, the ends depend only on
the position, and a cached prefix that ends past the first shrink still gives a fresh prefill's numbers."""

from __future__ import annotations

import dataclasses

import pytest
from test_serve_invariance import load, prompts, run_one

from lmforge import cpu_kernels
from lmforge.config import ModelConfig
from lmforge.serve.batching import Scheduler
from lmforge.serve.chunks import ATTN_COST, STEP, ChunkSchedule, bounds, cost_growth

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMOL = ModelConfig(vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                   d_ff=1536)  # SmolLM2-135M's shape


def _cost(a: int, b: int, attn: float) -> float:
    """SmolLM2's multiply-adds for prompt tokens a..b-1 (attention's weighted by attn), counted query by query:
    the linears' (q, k, v, o and the SwiGLU MLP) plus q.k and p.v over the q + 1 keys each query sees."""
    linear = 576 * 64 * (2 * 9 + 2 * 3) + 576 * 1536 * 3
    return sum(linear + attn * 2 * 9 * 64 * (q + 1) for q in range(a, b))


def test_no_chunk_costs_more_than_the_first():
    ends = bounds(SMOL, 128)
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    assert ends[0] == 0 and ends[-1] >= SMOL.context_length
    assert sizes[0] == 128 and sorted(sizes, reverse=True) == sizes  # never grows again
    assert all(s == 128 or (s % STEP == 0 and s >= 16) for s in sizes)
    first = _cost(0, 128, ATTN_COST)
    for a, s in zip(ends, sizes):
        if a + s > 6000:
            break
        # each chunk the largest that costs no more than the first (to the midpoint rule's rounding)
        assert _cost(a, a + s, ATTN_COST) <= first * 1.001 or s == 16
        assert s == 128 or _cost(a, a + s + STEP, ATTN_COST) > first * 0.999
    # 4,000 tokens in, a chunk is about 128 / (the cost per token there over at the start)
    at = ends[next(i for i, e in enumerate(ends) if e >= 4000)]
    growth = cost_growth(SMOL)(at)
    assert growth > 2 and 128 / growth - STEP - 1 <= dict(zip(ends, sizes))[at] <= 128 / growth + 1
    # the halving schedule this replaced let a chunk cost up to sqrt(2) times the first one
    assert max(_cost(a, a + s, ATTN_COST) for a, s in zip(ends, sizes) if a < 6000) / first <= 1.001


def test_a_windowed_model_stops_shrinking_at_its_window():
    windowed = dataclasses.replace(SMOL, sliding_window=512)
    ends = bounds(windowed, 128)
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    past = {s for a, s in zip(ends, sizes) if a >= 512 + 128}  # chunks past the window all cost the same
    assert len(past) == 1 and 64 < past.pop() < 128
    assert cost_growth(windowed)(100_000) == cost_growth(windowed)(512)


def test_ends_lookups():
    s = ChunkSchedule(SMOL, 128)
    e = s.ends
    for m in (0, 1, 127, 128, 1100, e[20] - 1, e[20], e[20] + 1, 8191):
        f = s.floor(m)
        assert f in e and f <= m and (e[e.index(f) + 1] > m)
        nxt = s.next_end(m, 10_000)
        assert nxt > m and nxt in e and s.floor(nxt - 1) == f
    assert s.next_end(e[20], e[20] + 3) == e[20] + 3  # the prompt's end
    assert s.floor(10**6) == e[-1]


def test_a_cached_prefix_past_the_first_shrink_gives_the_fresh_numbers(invariance_model_dir, monkeypatch):
    """Prompts of 420-500 tokens whose first 300 another request cached (the invariance model's chunks shrink
    after the first with a 64-token chunk: attention is most of its cost): the same tokens and logprob bytes as
    with the cache empty, and the reuse goes up to the schedule's end before the cached length."""
    gen = load(invariance_model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    ps = prompts(4, 21, lo=420, hi=500)
    one = run_one
    fresh = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=64)
    cached = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=64, prefix_cache_bytes=64 << 20)
    sched_ends = fresh._engine.schedule.ends
    assert sched_ends[:2] == [0, 64] and sched_ends[2] - sched_ends[1] < 64 and 256 < fresh._engine.schedule.floor(300)
    try:
        want = [one(fresh, ids, max_tokens=6) for ids in ps]
        got = []
        for i, ids in enumerate(ps):
            head = ids[:300]
            one(cached, head + prompts(1, 70 + i, 100, 110)[0], max_tokens=2)  # leaves the first 300 cached
            before = cached.stats["reused_tokens"]
            got.append(one(cached, ids, max_tokens=6))
            reused = cached.stats["reused_tokens"] - before
            assert reused == cached._engine.schedule.floor(300) not in (0, 300), reused
    finally:
        fresh.close()
        cached.close()
    assert got == want
