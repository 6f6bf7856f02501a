"""Batch invariance, exact prefix reuse and chunked prefill in the server's scheduler (issue 36 items 1-3).

A request's tokens and logprobs must be the same bytes whether it runs alone or in a burst of other requests,
on the int4 path and in float32, with lmforge's CPU kernels on and off; a prompt whose first half comes from the
prefix cache must give what it gives with the cache empty; a long prompt is prefilled in chunks between the
running rows' decode steps. The model is a random llama wide enough that its near-flat logits flip a greedy
token on a last-bit difference (the failure these tests catch), with 4 layers so differences can grow.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from lmforge import cpu_kernels
from lmforge.serve.batching import Scheduler
from lmforge.serve.requests import Event, GenRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 300


class Collect:
    """A request's emit(): token ids and logprobs (ids come with logprobs), text, and when each piece came."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.times: list[float] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "text":
            self.text += ev.text
            for lp in ev.logprobs or []:
                self.tokens.append(lp.token)
                self.logprobs.append(lp.logprob)
                self.times.append(time.monotonic())
        else:
            self.error = ev.error
            self.done.set()

    def result(self) -> tuple:
        assert self.done.wait(120), "a request did not finish"
        assert self.error is None, self.error
        return self.tokens, self.logprobs, self.text


@pytest.fixture(scope="module")
def model_dir(invariance_model_dir):
    return invariance_model_dir


def load(model_dir, quantize: str, kernels: str, monkeypatch):
    """A Generator on the int4 default path (quantize "4") or float32, with lmforge's kernels on or off."""
    from lmforge.generator import Generator

    if kernels == "on" and cpu_kernels.failure() is not None:
        pytest.skip(f"lmforge's CPU kernels are not available here: {cpu_kernels.failure()}")
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)
    return Generator.load(model_dir, quantize=quantize)


def prompts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_one(sched: Scheduler, ids: list[int], max_tokens: int = 12) -> tuple:
    """One greedy request with logprobs, alone -> (tokens, logprobs, text)."""
    c = Collect()
    sched.submit(GenRequest(list(ids), SamplingParams(max_tokens=max_tokens, logprobs=0), c))
    return c.result()


def submit(sched: Scheduler, specs: list[tuple[list[int], dict, int]]) -> list[Collect]:
    """specs: (prompt ids, sampling params, n rows); a request's n rows go in together (its seeded group)."""
    out = []
    for g, (ids, params, n) in enumerate(specs):
        cs = [Collect() for _ in range(n)]
        group = g if n > 1 else None
        sched.submit_many([GenRequest(list(ids), SamplingParams(logprobs=0, group=group, **params), c) for c in cs])
        out += cs
    return out


CASES = [("4", "on"), ("4", "off"), ("none", "on"), ("none", "off")]


@pytest.mark.parametrize("quantize,kernels", CASES)
def test_a_burst_gives_each_request_what_it_gets_alone(model_dir, quantize, kernels, monkeypatch):
    """24 greedy requests (different prompts and max_tokens) and 4 seeded n=3 requests at once, 36 rows (above
    the 32 rows where the int kernels' default switched to a float GEMM), against each request alone."""
    gen = load(model_dir, quantize, kernels, monkeypatch)
    greedy = [(ids, {"max_tokens": 14 + (i * 7) % 23}, 1) for i, ids in enumerate(prompts(24, 1))]
    seeded = [(ids, {"max_tokens": 16 + 5 * i, "temperature": 0.9, "top_p": 0.95, "seed": 100 + i}, 3)
              for i, ids in enumerate(prompts(4, 2))]
    specs = greedy + seeded
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=40, runtime=gen.runtime, prefill_chunk=64)
    try:
        burst = [c.result() for c in submit(sched, specs)]
        assert sched.stats["max_rows"] > 32
        alone = []
        for spec in specs:
            alone += [c.result() for c in submit(sched, [spec])]
    finally:
        sched.close()
    for i, (b, a) in enumerate(zip(burst, alone)):
        assert b == a, f"row {i}: the burst gave {b[0]}, alone {a[0]}"


@pytest.mark.parametrize("quantize,kernels", CASES)
def test_a_cached_first_half_gives_the_fresh_numbers(model_dir, quantize, kernels, monkeypatch):
    """20 prompts whose first half another request left in the prefix cache: the same tokens, and logprobs to
    1e-6 (they are the same bytes), as with the cache empty."""
    gen = load(model_dir, quantize, kernels, monkeypatch)
    ps = prompts(20, 3, lo=40, hi=80)
    one = run_one
    fresh = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=8)
    cached = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=8, prefix_cache_bytes=64 << 20)
    try:
        want = [one(fresh, ids) for ids in ps]
        assert fresh.stats["reused_tokens"] == 0
        got = []
        for i, ids in enumerate(ps):
            half = ids[: len(ids) // 2]
            one(cached, half + prompts(1, 50 + i, 5, 10)[0], max_tokens=3)  # leaves the first half in the cache
            before = cached.stats["reused_tokens"]
            got.append(one(cached, ids))
            assert cached.stats["reused_tokens"] - before >= len(half) - 8, "the prefix was not reused"
    finally:
        fresh.close()
        cached.close()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g[0] == w[0], f"prompt {i}: cached {g[0]}, fresh {w[0]}"
        assert max(abs(a - b) for a, b in zip(g[1], w[1])) <= 1e-6
        assert g == w  # in fact the same bytes


def test_a_long_prompt_is_prefilled_between_decode_steps(model_dir, monkeypatch):
    """A 400-token prompt arriving while a stream runs: with 32-token chunks the stream keeps getting tokens
    while the prompt prefills (a decode step after each chunk); with chunking off it gets at most one."""
    gen = load(model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    long_ids = prompts(1, 9, 400, 400)[0]
    for chunk, want_min, want_max in ((32, 8, 10_000), (0, 0, 1)):
        sched = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=chunk)
        try:
            stream = GenRequest(prompts(1, 8)[0], SamplingParams(max_tokens=450), Collect())
            sched.submit(stream)
            while stream.completion_tokens < 3:
                time.sleep(0.001)
            req = GenRequest(long_ids, SamplingParams(max_tokens=2), Collect())
            sched.submit(req)
            seen = []  # (time, the stream's tokens so far), polled while the long prompt prefills
            while req.first_token_at is None:
                seen.append((time.monotonic(), stream.completion_tokens))
                time.sleep(0.0005)
            req.emit.result()
            during = [n for t, n in seen if req.started_at <= t <= req.first_token_at]
            got = during[-1] - during[0] if during else 0
            assert want_min <= got <= want_max, (chunk, got)
            sched.cancel(stream)
        finally:
            sched.close()


def test_flags_reach_the_scheduler(tiny_dir):
    import argparse

    from lmforge.cli.serve import build_app, register
    from lmforge.serve.engine import DEFAULT_PREFILL_CHUNK
    from lmforge.serve.settings import ServeSettings

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="verb"))
    sched = build_app(p.parse_args(["serve", "--model", str(tiny_dir)])).state.lmforge.sched
    assert sched.batch_invariant and sched.prefill_chunk == DEFAULT_PREFILL_CHUNK == ServeSettings().prefill_chunk
    a = p.parse_args(["serve", "--model", str(tiny_dir), "--batch-invariant", "off", "--prefill-chunk", "0"])
    sched = build_app(a).state.lmforge.sched
    assert not sched.batch_invariant and sched.prefill_chunk == 0
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--prefill-chunk", "-1"])
    from lmforge.errors import LmforgeError
    from lmforge.serve.engine import PREFIX_GRAIN

    assert ServeSettings().prefix_grain == PREFIX_GRAIN
    assert build_app(p.parse_args(["serve", "--model", str(tiny_dir)])).state.lmforge.sched._engine.grain == 16
    for grain, want in (("32", 32), ("0", DEFAULT_PREFILL_CHUNK)):
        a = p.parse_args(["serve", "--model", str(tiny_dir), "--prefix-grain", grain])
        assert build_app(a).state.lmforge.sched._engine.grain == want
    with pytest.raises(LmforgeError, match="prefix_grain 48 must be 0 or divide prefill_chunk 128"):
        build_app(p.parse_args(["serve", "--model", str(tiny_dir), "--prefix-grain", "48"]))


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_row_is_the_same_in_a_call_of_any_size(kernels, bits, monkeypatch):
    """The kernel level: with cover_rows, row 0 of x gives the same bits in calls of 1 to 48 rows, wherever it
    sits (lmforge's integer kernels: a fixed order per output whatever the tile shape; torch's packed ones)."""
    from lmforge.quant.layers import QuantLinear
    from lmforge.quant.policy import cover_rows

    if kernels == "on" and cpu_kernels.failure() is not None:
        pytest.skip(f"lmforge's CPU kernels are not available here: {cpu_kernels.failure()}")
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)
    torch.manual_seed(0)
    ql = QuantLinear.from_weight(torch.randn(96, 256), None, bits, 32 if bits == 4 else None).eval()
    cover_rows(ql, 48)
    x = torch.randn(48, 256)
    with torch.no_grad():
        ref = ql(x[:1])[0]
        for m in (2, 3, 5, 8, 17, 33, 48):
            assert torch.equal(ql(x[:m])[0], ref), m
            assert torch.equal(ql(torch.cat([x[1:m], x[:1]]))[-1], ref), m


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_float_rows_run_in_fixed_blocks(kernels, monkeypatch):
    """A row's float product is the same in any number of rows: lmforge's f32_linear where its kernels run,
    else fixed row blocks."""
    from lmforge import cpu_kernels
    from lmforge.model.invariant import KERNEL, linear_rows, rows_block

    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)
    torch.manual_seed(0)
    w, b = torch.randn(40, 64), torch.randn(40)
    block = rows_block(w)
    assert block == (KERNEL if cpu_kernels.available() else block) and block in (KERNEL, 1, 2, 4, 8)
    if kernels == "off":
        assert block != KERNEL
    x = torch.randn(13, 64)
    ref = linear_rows(x[:1], w, b, block)[0]
    for m in (2, 5, 8, 13):
        y = linear_rows(x[:m], w, b, block)  # (m, 40)
        assert y.shape == (m, 40) and torch.equal(y[0], ref)
        assert torch.allclose(y, torch.nn.functional.linear(x[:m], w, b), atol=1e-5)
    assert linear_rows(x.view(13, 1, 64), w, None, block).shape == (13, 1, 40)


def test_invariant_float_linears_run_the_kernel(model_dir, own):
    """set_batch_invariant gives float32 linears and the tied head f32_linear where the kernels run, and takes it
    back when turned off."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.invariant import KERNEL, set_batch_invariant

    model = load_checkpoint(model_dir, tokenizer=False).model
    set_batch_invariant(model, True)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.row_block == KERNEL for m in linears) and model.row_block == KERNEL
    set_batch_invariant(model, False)
    assert all("forward" not in m.__dict__ for m in linears)


@pytest.mark.parametrize("quantize,kernels", CASES)
def test_a_cached_prefix_shorter_than_a_chunk_gives_the_fresh_numbers(model_dir, quantize, kernels, monkeypatch):
    """With 64-token chunks and an 8-token grain, prompts shorter than one chunk reuse a cached first half (they
    run in 8-token pieces, fresh or not): the same bytes as with the cache empty."""
    gen = load(model_dir, quantize, kernels, monkeypatch)
    ps = prompts(8, 4, lo=30, hi=60)
    one = run_one

    kw = {"runtime": gen.runtime, "prefill_chunk": 64, "prefix_grain": 8}
    fresh = Scheduler(gen.model, gen.tokenizer, **kw)
    cached = Scheduler(gen.model, gen.tokenizer, prefix_cache_bytes=64 << 20, **kw)
    try:
        want = [one(fresh, ids) for ids in ps]
        got = []
        for i, ids in enumerate(ps):
            half = ids[: len(ids) // 2]
            one(cached, half + prompts(1, 60 + i, 5, 10)[0], max_tokens=2)
            before = cached.stats["reused_tokens"]
            got.append(one(cached, ids))
            assert cached.stats["reused_tokens"] - before >= len(half) - 8, "the prefix was not reused"
        # a prompt of a chunk or more runs its first chunk in one call: the short prompts' pieces are not reused
        long = ps[0] + prompts(1, 99, 40, 40)[0]
        before = cached.stats["reused_tokens"]
        got.append(one(cached, long))
        want.append(one(fresh, long))
        assert cached.stats["reused_tokens"] == before
    finally:
        fresh.close()
        cached.close()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i}: cached {g[0]}, fresh {w[0]}"


def test_prompts_admitted_together_share_one_chunk_budget(model_dir, monkeypatch):
    """8 short prompts arriving at once while a stream runs: between two decode steps the worker prefills at
    most one chunk's tokens in all (not a chunk per prompt), so the stream waits about one chunk at a time."""
    gen = load(model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    sched = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=32)
    eng, events = sched._engine, []
    prefill, step = eng.prefill_chunk, eng.step

    def spy_prefill(job):
        events.append(prefill(job))
        return events[-1]

    def spy_step(*a, **k):
        events.append("step")
        return step(*a, **k)

    monkeypatch.setattr(eng, "prefill_chunk", spy_prefill)
    monkeypatch.setattr(eng, "step", spy_step)
    try:
        stream = GenRequest(prompts(1, 20)[0], SamplingParams(max_tokens=200), Collect())
        sched.submit(stream)
        while stream.completion_tokens < 2:
            time.sleep(0.001)
        cs = submit(sched, [(ids, {"max_tokens": 2}, 1) for ids in prompts(8, 21, 14, 20)])
        for c in cs:
            c.result()
        sched.cancel(stream)
    finally:
        sched.close()
    between, worst = 0, 0
    for e in events:
        between = 0 if e == "step" else between + e
        worst = max(worst, between)
    assert 14 <= worst <= 32, events


def test_a_long_prompt_among_short_rows_runs_in_a_group_of_its_own(model_dir, monkeypatch):
    """A 300-token prompt joining short rows starts a row group of its own (so the short rows' cache is not made
    as wide as it), later short rows join the short group, and every request gets what it gets alone."""
    gen = load(model_dir, "4", "off" if cpu_kernels.failure() else "on", monkeypatch)
    specs = ([(ids, {"max_tokens": 24}, 1) for ids in prompts(6, 11)]
             + [(prompts(1, 12, 300, 300)[0], {"max_tokens": 6}, 1)]
             + [(ids, {"max_tokens": 10}, 1) for ids in prompts(3, 13)])
    sched = Scheduler(gen.model, gen.tokenizer, runtime=gen.runtime, prefill_chunk=64)
    eng, shapes = sched._engine, []
    eng.group_pad = 64
    join = eng.join

    def spy(*a, **k):
        join(*a, **k)
        shapes.append(sorted((g.width, g.rows) for g in eng.groups))

    monkeypatch.setattr(eng, "join", spy)
    try:
        burst = [c.result() for c in submit(sched, specs)]
        alone = []
        for spec in specs:
            alone += [c.result() for c in submit(sched, [spec])]
    finally:
        sched.close()
    assert any(len(s) == 2 and s[0][0] < 100 <= 300 <= s[1][0] for s in shapes), shapes
    for i, (b, a) in enumerate(zip(burst, alone)):
        assert b == a, f"row {i}: the burst gave {b[0]}, alone {a[0]}"
