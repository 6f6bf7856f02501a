"""Continuous batching and prefix reuse in the server's scheduler (issue 12 items 3-4), on a tiny random llama.

References are computed with lmforge.decoding on one prompt alone (the float32 path the CLI runs), so "same
text" means that joining, leaving, left-padding and reused prefixes changed nothing.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
from test_serve import _prompt, gate_forwards  # noqa: E402

from lmforge.decoding import DecodeRuntime, GenerationConfig, TextStreamer, generate  # noqa: E402
from lmforge.serve.batching import Scheduler  # noqa: E402
from lmforge.serve.prefix_cache import PrefixCache  # noqa: E402
from lmforge.serve.requests import Event, GenRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # gen: tests/conftest.py


class Collect:
    """A request's emit(): gathers its text pieces, token ids (logprobs) and end."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "text":
            self.pieces.append(ev.text)
            for lp in ev.logprobs or []:
                self.tokens.append(lp.token)
                self.logprobs.append(lp.logprob)
        else:
            self.reason, self.error = ev.finish_reason, ev.error
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def request(ids: list[int], **params) -> tuple[GenRequest, Collect]:
    c = Collect()
    params.setdefault("logprobs", 0)  # token ids come back with the text
    return GenRequest(list(ids), SamplingParams(**params), c), c


def wait(*cs: Collect, timeout: float = 60) -> None:
    for c in cs:
        assert c.done.wait(timeout), "a request did not finish"
        assert c.error is None, c.error


def alone(gen, ids: list[int], max_tokens: int, stop: tuple[str, ...] = (), eos: bool = True,
          **sampling) -> tuple[str, str, list[int]]:
    """(text, finish reason, token ids) of one prompt decoded alone by lmforge.decoding."""
    gc = GenerationConfig(max_new_tokens=max_tokens, stop_token_ids=None if eos else [], **sampling)
    out = generate(gen.model, torch.tensor([ids]), gc=gc)[0]
    st = TextStreamer(lambda t: gen.tokenizer.decode(t, skip_special_tokens=True), list(stop))
    stops = set(gen.model.cfg.eos_ids) if eos else set()
    text, toks = "", []
    for t in out:
        if t in stops:
            return text + st.end(), "stop", toks
        toks.append(t)
        text += st.put(t)
        if st.stopped:
            return text, "stop", toks
    return text + st.end(), "length", toks


@pytest.fixture
def sched(gen):
    s = Scheduler(gen.model, gen.tokenizer, max_batch=8, max_queue=16, prefix_cache_bytes=0)
    yield s
    s.close()


def ids_of(gen, i: int, repeat: int = 1) -> list[int]:
    return gen.tokenizer.encode(" ".join([_prompt(i)] * repeat), add_special_tokens=False)


# ---- continuous batching ---------------------------------------------------------------------------------------
def test_staggered_requests_each_give_their_text_alone(gen, sched):
    rows = []
    for i in range(8):
        ids = ids_of(gen, i, repeat=1 + i % 3)
        m = 6 + 5 * i
        full, _, _ = alone(gen, ids, m)
        stop = (full[len(full) // 2: len(full) // 2 + 3],) if i % 2 and len(full) >= 6 else ()
        rows.append((ids, m, stop, alone(gen, ids, m, stop)))
    gate, hook = gate_forwards(gen.model, delay=0.004)  # slow steps so that arrivals land mid-batch
    gate.set()
    try:
        reqs = []
        for ids, m, stop, _ in rows:
            reqs.append(request(ids, max_tokens=m, stop=stop))
            sched.submit(reqs[-1][0])
            time.sleep(0.03)
        wait(*(c for _, c in reqs))
    finally:
        hook.remove()
    for (ids, m, stop, (text, reason, toks)), (r, c) in zip(rows, reqs):
        assert (c.text, c.reason, c.tokens) == (text, reason, toks), (ids, m, stop)
        assert r.completion_tokens == len(toks)
    assert any(o.first_token_at < r.started_at < o.finished_at for r, _ in reqs for o, _ in reqs), \
        "no request joined a running batch"
    t0 = time.monotonic()
    while sched.batch_rows and time.monotonic() - t0 < 2:  # the last row leaves just after its "done" event
        time.sleep(0.002)
    assert sched.stats["max_rows"] >= 3 and sched.batch_rows == 0


def test_a_request_joining_mid_batch_gets_its_first_token_before_the_batch_ends(gen, sched):
    sched.eos = set()  # the random model may say EOS early: these rows run to max_tokens
    gate, hook = gate_forwards(gen.model, delay=0.01)
    gate.set()
    try:
        long_reqs = [request(ids_of(gen, i), max_tokens=80) for i in range(3)]
        for r, _ in long_reqs:
            sched.submit(r)
        while min(r.completion_tokens for r, _ in long_reqs) < 5:
            time.sleep(0.005)
        ids = ids_of(gen, 10)
        late, lc = request(ids, max_tokens=4)
        sched.submit(late)
        wait(lc)
        assert all(r.finished_at is None for r, _ in long_reqs)  # the batch was still running ...
        wait(*(c for _, c in long_reqs))
    finally:
        hook.remove()
    assert late.first_token_at < min(r.finished_at for r, _ in long_reqs)  # ... and the late one was served
    assert late.finished_at < min(r.finished_at for r, _ in long_reqs)
    assert lc.text == alone(gen, ids, 4, eos=False)[0]
    for i, (_, c) in enumerate(long_reqs):
        assert c.text == alone(gen, ids_of(gen, i), 80, eos=False)[0] and c.reason == "length"


def test_a_cancelled_row_leaves_the_batch(gen, sched):
    sched.eos = set()
    gate, hook = gate_forwards(gen.model, delay=0.01)
    gate.set()
    try:
        reqs = [request(ids_of(gen, i), max_tokens=60) for i in range(3)]
        for r, _ in reqs:
            sched.submit(r)
        while sched.batch_rows < 3 or min(r.completion_tokens for r, _ in reqs) < 3:
            time.sleep(0.005)
        gone = reqs[1][0]
        sched.cancel(gone)
        assert sched.running == 2  # the slot is free at once
        t0 = time.monotonic()
        while sched.batch_rows != 2 and time.monotonic() - t0 < 5:
            time.sleep(0.002)
        assert sched.batch_rows == 2  # the batch shrank at the next step
        at_cancel = gone.completion_tokens
        wait(reqs[0][1], reqs[2][1])
    finally:
        hook.remove()
    assert gone.completion_tokens == at_cancel < 60 and not reqs[1][1].done.is_set()
    for i in (0, 2):
        assert reqs[i][1].text == alone(gen, ids_of(gen, i), 60, eos=False)[0]


def test_n3_with_a_seed_is_reproducible_while_other_requests_run(gen, sched):
    ids = ids_of(gen, 3, repeat=2)

    def seeded(group: int) -> list[Collect]:
        rs = [request(ids, max_tokens=12, temperature=1.0, seed=1234, group=group) for _ in range(3)]
        sched.submit_many([r for r, _ in rs])
        return [c for _, c in rs]

    first = seeded(1)
    wait(*first)
    texts = [c.text for c in first]
    assert len(set(texts)) > 1  # three draws, not one row three times
    # choice 0 draws what lmforge.decoding draws with that seed alone
    assert texts[0] == alone(gen, ids, 12, temperature=1.0, seed=1234)[0]
    gate, hook = gate_forwards(gen.model, delay=0.003)
    gate.set()
    try:
        others = [request(ids_of(gen, i), max_tokens=30, temperature=0.9, top_k=20) for i in range(3)]
        others += [request(ids_of(gen, i, 2), max_tokens=30, repetition_penalty=1.3) for i in range(2)]
        for r, _ in others:
            sched.submit(r)
        time.sleep(0.05)
        again = seeded(2)
        wait(*again, *(c for _, c in others))
    finally:
        hook.remove()
    assert [c.text for c in again] == texts
    assert sched.stats["max_rows"] >= 4


# ---- prefix reuse ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("invariant", [True, False])
def test_prefix_reuse_returns_the_same_tokens_as_no_reuse(gen, invariant):
    """Batch-invariant (the default): the first turn's prompt is reused up to the last 16-token chunk boundary
    (what a fresh prefill computes the same way); the reply's columns came from decode steps, so they are not.
    Without invariance: the prompt and the reply fed back are reused whole (the same tokens, not the same bits)."""
    turn1 = ids_of(gen, 5, repeat=6)[:60]
    more = gen.tokenizer.encode(" the cat sat on the mat", add_special_tokens=False)
    kw = {"batch_invariant": invariant, "prefill_chunk": 16}
    with_reuse = Scheduler(gen.model, gen.tokenizer, prefix_cache_bytes=1 << 20, **kw)
    without = Scheduler(gen.model, gen.tokenizer, prefix_cache_bytes=0, **kw)
    try:
        r1, c1 = request(turn1, max_tokens=20)
        with_reuse.submit(r1)
        wait(c1)
        turn2 = turn1 + c1.tokens + more  # the chat's next turn: the first one, its reply, a new message
        got, ref = request(turn2, max_tokens=16), request(turn2, max_tokens=16)
        with_reuse.submit(got[0])
        without.submit(ref[0])
        wait(got[1], ref[1])
    finally:
        with_reuse.close()
        without.close()
    if invariant:
        assert with_reuse.stats["reused_tokens"] == 48  # 60 prompt tokens, on the 16-token grid
        assert got[1].logprobs == ref[1].logprobs  # the same bits
    else:
        assert with_reuse.stats["reused_tokens"] >= len(turn1)  # the whole first turn was not prefilled again
    assert without.stats["reused_tokens"] == 0
    assert got[1].tokens == ref[1].tokens and got[1].text == ref[1].text


def test_prefix_cache_keeps_the_longest_and_evicts_the_least_recently_used():
    def kv(n: int) -> list[torch.Tensor]:
        return [torch.full((2, n, 4), float(n))]  # one layer, (n_kv, n, hd): 32 n bytes

    pc = PrefixCache(budget_bytes=2 * 32 * 20 * 2, min_tokens=2)  # room for two 20-token entries (k and v)
    a, b, c = list(range(20)), list(range(100, 120)), list(range(200, 220))
    pc.store(a[:10], kv(10), kv(10))
    pc.store(a, kv(20), kv(20))  # extends the first: replaces it
    assert len(pc) == 1 and pc.used == 2 * 32 * 20
    pc.store(b, kv(20), kv(20))
    assert pc.lookup(a + [7])[0] == 20  # a is now the most recently used
    pc.store(c, kv(20), kv(20))  # over budget: b goes
    assert pc.lookup(b + [1]) is None and pc.lookup(c[:5] + [9])[0] == 5
    m, k, _ = pc.lookup(a)  # all of a: one token is left to prefill
    assert m == 19 and k[0].shape == (2, 19, 4)
    m, k, _ = pc.lookup(a, align=8)  # the batch-invariant engine's chunk grid: 19 -> 16
    assert m == 16 and k[0].shape == (2, 16, 4)
    assert PrefixCache(0).lookup(a) is None


def test_prefix_cache_setting_reaches_the_scheduler(gen):
    from lmforge.serve import ServeSettings, create_app

    on = create_app(gen, settings=ServeSettings(prefix_cache_mb=8)).state.lmforge.sched
    off = create_app(gen, settings=ServeSettings(prefix_cache_mb=0)).state.lmforge.sched
    assert on.prefix_cache is not None and on.prefix_cache.budget == 8 << 20 and off.prefix_cache is None


def test_a_lone_row_runs_the_traced_step_with_the_same_text(gen):
    """Batch-1 steps go through the traced static step (a bucketed cache, one trace per length); rows that share
    the batch run eagerly; either way every request gives its text alone, also when the batch shrinks back to one
    row (its cache is then re-bucketed)."""
    rt = DecodeRuntime(gen.model)  # shared by the schedulers below: the traces made here are reused there
    s = Scheduler(gen.model, gen.tokenizer, max_batch=8, max_queue=16, compile="trace", runtime=rt)
    try:
        ids = ids_of(gen, 1, repeat=2)
        want = alone(gen, ids, 40, eos=False)
        s.eos = set()
        r, c = request(ids, max_tokens=40)
        s.submit(r)
        wait(c)
        assert (c.text, c.reason, c.tokens) == want
        assert s.decode_step.startswith("traced (torch.jit.trace, cpu, cache length 256)")
        # a short and a long request together: two rows (eager), then the long one alone (traced again)
        short, long_ = ids_of(gen, 2), ids_of(gen, 3, repeat=3)
        wants = [alone(gen, short, 5, eos=False), alone(gen, long_, 60, eos=False)]
        reqs = [request(short, max_tokens=5), request(long_, max_tokens=60)]
        s.submit_many([r for r, _ in reqs])
        wait(*(c for _, c in reqs))
        for (_, c), w in zip(reqs, wants):
            assert (c.text, c.reason, c.tokens) == w
        assert s.stats["max_rows"] == 2 and s.decode_step.startswith("traced")
    finally:
        s.close()
    off = Scheduler(gen.model, gen.tokenizer, compile="off", runtime=rt)
    auto = Scheduler(gen.model, gen.tokenizer, runtime=rt)  # auto: 40 steps would not pay for a trace; it exists
    try:
        for sch, path in ((off, "eager"), (auto, "traced")):
            sch.eos = set()
            r, c = request(ids, max_tokens=40)
            sch.submit(r)
            wait(c)
            assert (c.text, c.reason, c.tokens) == want and sch.decode_step.startswith(path)
    finally:
        off.close()
        auto.close()


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_batched_steps_equal_the_eager_forward(gen, monkeypatch, kernels):
    """Several rows step through Transformer.decode_hidden, the lone row through the eager forward: the logits
    of both agree, also after a row left and the padding columns were cut (the caches are then strided views).
    kernels auto: its attention is lmforge's decode_attn (CPU, float32); off: SDPA over every column of the
    cache, the path of CUDA, bf16 and soft-capped models, which also reads the columns not written yet (masked,
    and zeros: uninitialised memory there would turn the rows' outputs into nan)."""
    from lmforge.serve.engine import BatchDecoder

    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)

    def run(batched: bool) -> list[torch.Tensor]:
        eng = BatchDecoder(gen.model, compile="off")
        eng.batched_ok = batched
        eng.join([(eng.prefill(ids_of(gen, i, repeat=i))[0], ids_of(gen, i, repeat=i)) for i in (1, 2, 3)])
        assert len(eng.groups) == 1  # rows of similar lengths share one cache
        g = eng.groups[0]
        assert all(not t[:, :, g.width:].any() for t in g.cache.k + g.cache.v)  # room to come: zeros
        out = [eng.step([5, 6, 7]), eng.step([8, 9, 10])]
        eng.drop([2])  # the longest row leaves: leading padding columns are cut off
        out += [eng.step([11, 12]), eng.step([13, 14])]
        return out

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_row_past_the_context_length_is_an_error(gen):
    """decode_hidden does not check the context length itself (generate's caller does): the engine does, as the
    eager forward did, with a typed error rather than an index error in the position table."""
    from lmforge.errors import GenerationError
    from lmforge.serve.engine import BatchDecoder

    eng = BatchDecoder(gen.model, compile="off")
    ctx = gen.model.cfg.context_length
    ids = ids_of(gen, 1)
    eng.join([(eng.prefill(ids)[0], ids), (eng.prefill(ids[:3])[0], ids[:3])])
    eng.groups[0].n_real[0] = ctx  # as if row 0 had reached the context length
    with pytest.raises(GenerationError, match="exceeds the model's context_length"):
        eng.step([1, 2])
