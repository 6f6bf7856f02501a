"""The prefill chunk schedule (lmforge/serve/chunks.py): chunks shrink as the context grows, the ends depend only on
the position, and a cached prefix that ends past the first shrink still gives a fresh prefill's numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
from test_serve_invariance import load, prompts, run_one

from lmforge import cpu_kernels
from lmforge.config import ModelConfig
from lmforge.serve.batching import Scheduler
from lmforge.serve.chunks import ChunkSchedule, bounds, cost_growth

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMOL = ModelConfig(vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                   d_ff=1536)  # SmolLM2-135M's shape


def test_chunks_shrink_as_each_one_would_cost_more():
    ends = bounds(SMOL, 128)
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    assert ends[0] == 0 and ends[-1] >= SMOL.context_length
    assert sizes[0] == 128 and sorted(sizes, reverse=True) == sizes  # never grows again
    assert set(sizes) <= {128, 64, 32, 16}
    growth = cost_growth(SMOL)
    for a, s in zip(ends, sizes):
        assert a % s == 0  # each step divides its start: every end is on the grid of the steps after it
        # the modelled cost of a chunk stays within sqrt(2) of the first one's, until the smallest chunk
        assert s * growth(a) <= 128 * math.sqrt(2) * 1.01 or s == 16
    # attention per key is ~1/3000 of SmolLM2's linears per token: half-size chunks from ~1.2k tokens in
    assert 1000 < ends[sizes.index(64)] < 1500


def test_a_windowed_model_stops_shrinking_at_its_window():
    windowed = dataclasses.replace(SMOL, sliding_window=512)
    ends = bounds(windowed, 128)
    assert {b - a for a, b in zip(ends, ends[1:])} == {128}  # cost growth at 512 keys is under sqrt(2)
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
    """Prompts of 420-500 tokens whose first 300 another request cached (the invariance model's chunks halve
    at ~240 tokens with a 64-token chunk): the same tokens and logprob bytes as with the cache empty, and the
    reuse goes up to the schedule's end before the cached length."""
    gen = load(invariance_model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    ps = prompts(4, 21, lo=420, hi=500)
    one = run_one
    fresh = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=64)
    cached = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=64, prefix_cache_bytes=64 << 20)
    sched_ends = fresh._engine.schedule.ends
    assert sched_ends[:5] == [0, 64, 128, 192, 256] and sched_ends[5] - sched_ends[4] < 64
    try:
        want = [one(fresh, ids, max_tokens=6) for ids in ps]
        got = []
        for i, ids in enumerate(ps):
            head = ids[:300]
            one(cached, head + prompts(1, 70 + i, 100, 110)[0], max_tokens=2)  # leaves the first 300 cached
            before = cached.stats["reused_tokens"]
            got.append(one(cached, ids, max_tokens=6))
            reused = cached.stats["reused_tokens"] - before
            assert reused == cached._engine.schedule.floor(300) == 288, reused
    finally:
        fresh.close()
        cached.close()
    assert got == want
