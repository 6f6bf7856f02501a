"""A long prompt arriving among running streams (issue 36 item 3): what the streams wait for between two tokens
is one prefill chunk and one decode step, nothing the prompt's arrival adds. Its prefill cache is left unwritten
when it is made (zeroing hundreds of MB held the streams for a good part of a chunk), so these tests fill that
memory with NaN and check that no path reads a column before a chunk wrote it: the replies are the same bytes as
with zeroed caches, and the room past the prompt ends up zero."""

from __future__ import annotations

import math

import pytest
import torch
from test_serve_invariance import load, prompts, run_one, submit

from lmforge import cpu_kernels
from lmforge.model.cache import KVCache
from lmforge.serve import engine
from lmforge.serve.batching import Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _filled(value: float):
    """engine._unwritten_cache with its memory set to `value` (NaN: garbage no computation may read)."""
    made = engine._unwritten_cache

    def make(cfg, max_len, device, dtype):
        c = made(cfg, max_len, device, dtype)
        for t in (*c.k, *c.v):
            t.fill_(value)
        return c
    return make


def test_the_prefill_cache_is_not_zeroed_when_made_and_ends_as_a_zeroed_one(invariance_model_dir, monkeypatch):
    gen = load(invariance_model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    dec = engine.BatchDecoder(gen.model, None, invariant=True, prefill_chunk=32)
    monkeypatch.setattr(torch, "zeros", None)  # begin_prefill must not zero (nor call KVCache, which does)
    ids = prompts(1, 31, 150, 150)[0]
    job = dec.begin_prefill(ids)
    monkeypatch.undo()
    monkeypatch.setattr(engine, "_unwritten_cache", _filled(math.nan))
    job = dec.begin_prefill(ids)
    while job.logits is None:
        dec.prefill_chunk(job)
    # the same chunks into a zeroed cache, by the model alone
    ref = KVCache(gen.model.cfg, 1, job.cache.max_len)
    ends = dec.schedule.ends
    with torch.inference_mode():
        for a, b in zip(ends, ends[1:]):
            if a >= len(ids):
                break
            gen.model(torch.tensor([ids[a: min(b, len(ids))]]), cache=ref)
    assert job.cache.length == ref.length == len(ids)
    for got, want in zip((*job.cache.k, *job.cache.v), (*ref.k, *ref.v)):
        assert torch.equal(got, want)  # the prompt's columns, and zeros past them (no NaN left)


@pytest.mark.parametrize("quantize", ["4", "none"])
def test_nothing_reads_an_unwritten_column(invariance_model_dir, quantize, monkeypatch):
    """Long and short prompts at once (rows joining groups, a long row starting its own, decode steps past the
    prompt, the prefix cache storing prompts): with NaN in every new prefill cache, each request gives the
    tokens and logprobs it gives alone with zeroed caches."""
    gen = load(invariance_model_dir, quantize, "off" if cpu_kernels.failure() else "on", monkeypatch)
    ps = prompts(6, 32, 5, 40) + prompts(2, 33, 200, 300)
    specs = [(ids, {"max_tokens": 6 + i % 5}, 1) for i, ids in enumerate(ps)]
    ref = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=32)
    try:
        want = [run_one(ref, ids, max_tokens=p["max_tokens"]) for ids, p, _ in specs]
    finally:
        ref.close()
    monkeypatch.setattr(engine, "_unwritten_cache", _filled(math.nan))
    sched = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=32, prefix_cache_bytes=32 << 20)
    try:
        got = [c.result() for c in submit(sched, specs)]
        again = [run_one(sched, ids, max_tokens=p["max_tokens"]) for ids, p, _ in specs[-2:]]  # from the cache
    finally:
        sched.close()
    assert got == want
    assert again == want[-2:]
    assert not any(math.isnan(x) for _, lps, _ in got for x in lps)
