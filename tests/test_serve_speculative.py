"""Prompt-lookup speculative decoding in the server (serve/speculate.py, issue 38 item 4): a greedy request alone in
the batch runs speculative rounds, and its tokens and logprobs are those of plain steps (the `speculative: "off"`
request, and lmforge.decoding.generate on the prompt alone), also when another request joins mid-way; sampled
requests never speculate. Tiny random llama (tests/conftest.py); its greedy text soon repeats itself, so prompt
lookup finds drafts and many are kept.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from conftest import serving  # noqa: E402
from test_serve import _prompt  # noqa: E402
from test_serve_batching import alone, request, wait  # noqa: E402

from lmforge.errors import GenerationError  # noqa: E402
from lmforge.serve.batching import Scheduler  # noqa: E402
from lmforge.serve.speculate import server_default  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, max_tokens=96) as srv:  # --speculative auto: prompt lookup on these float weights
        yield srv


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def spec_stats(server) -> dict:
    g = httpx.get(server.url + "/health", timeout=10).json()["generation"]
    return {k: g[k] for k in ("spec_rounds", "spec_drafted", "spec_accepted")}


def ids_of(gen, i: int, repeat: int = 3) -> list[int]:
    """A prompt that says the same few words `repeat` times: its continuation quotes it."""
    return gen.tokenizer.encode(" ".join([_prompt(i)] * repeat), add_special_tokens=False)


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_greedy_completions_are_the_same_with_and_without_speculation(server, gen):
    """Token ids, text, top logprobs: the speculating reply is the plain one's, and lmforge.decoding's alone."""
    rounds = accepted = 0
    for i in range(4):
        ids = ids_of(gen, i)
        m = 50
        body = {"prompt": ids, "max_tokens": m, "temperature": 0, "logprobs": 3}
        before = spec_stats(server)
        on = post(server, "/v1/completions", {**body, "speculative": "prompt-lookup"})
        mid = spec_stats(server)
        off = post(server, "/v1/completions", {**body, "speculative": "off"})
        auto = post(server, "/v1/completions", body)  # the server's default: prompt lookup here
        assert on.status_code == off.status_code == auto.status_code == 200, (on.text, off.text)
        assert delta(spec_stats(server), mid) == delta(mid, before)  # off: no round; auto: on's rounds again
        c_on, c_off = on.json()["choices"][0], off.json()["choices"][0]
        assert c_on == c_off
        assert auto.json()["choices"][0] == c_off
        text, reason, toks = alone(gen, ids, m)
        assert (c_on["text"], c_on["finish_reason"]) == (text, reason)
        assert len(c_on["logprobs"]["token_logprobs"]) == len(toks)
        d = delta(mid, before)
        rounds, accepted = rounds + d["spec_rounds"], accepted + d["spec_accepted"]
    assert rounds > 0 and accepted > 0, "no draft was verified and kept: the prompts do not exercise speculation"
    metrics = httpx.get(server.url + "/metrics", timeout=10).text  # the same totals for Prometheus
    now = spec_stats(server)
    for k in ("rounds", "drafted", "accepted"):
        assert f"lmforge_speculative_{k} {float(now['spec_' + k])}" in metrics


def test_greedy_chat_and_task_replies_are_the_same(server, gen):
    words = " ".join([_prompt(7)] * 3)
    chat = {"messages": [{"role": "user", "content": words}], "max_tokens": 40, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    before = spec_stats(server)
    on = post(server, "/v1/chat/completions", {**chat, "speculative": "prompt-lookup"}).json()
    assert spec_stats(server)["spec_rounds"] > before["spec_rounds"]
    off = post(server, "/v1/chat/completions", {**chat, "speculative": "off"}).json()
    assert on["choices"] == off["choices"]
    task = {"text": words, "max_tokens": 30}
    on = post(server, "/v1/summarize", {**task, "speculative": "prompt-lookup"})
    off = post(server, "/v1/summarize", {**task, "speculative": "off"})
    assert on.status_code == off.status_code == 200, (on.text, off.text)
    assert on.json()["summary"] == off.json()["summary"]


def test_speculative_off_runs_no_round(server, gen):
    before = spec_stats(server)
    r = post(server, "/v1/completions", {"prompt": ids_of(gen, 1), "max_tokens": 30, "temperature": 0,
                                         "speculative": "off"})
    assert r.status_code == 200
    assert spec_stats(server) == before


def test_a_seeded_sampled_request_never_speculates(server, gen):
    body = {"prompt": ids_of(gen, 2), "max_tokens": 30, "temperature": 0.9, "seed": 5, "logprobs": 1}
    before = spec_stats(server)
    a = post(server, "/v1/completions", {**body, "speculative": "prompt-lookup"})
    b = post(server, "/v1/completions", {**body, "speculative": "off"})
    assert a.status_code == b.status_code == 200
    assert spec_stats(server) == before
    assert a.json()["choices"] == b.json()["choices"]
    text, _, _ = alone(gen, body["prompt"], 30, temperature=0.9, seed=5)
    assert a.json()["choices"][0]["text"] == text


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "a cat", "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/v1/summarize", {"text": "a cat sat on the mat", "max_tokens": 4}),
])
def test_a_bad_speculative_value_is_a_400_naming_it(server, path, body):
    r = post(server, path, {**body, "speculative": "draft"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "speculative", r.json()


def test_the_server_default_follows_the_generator_rule(gen, int8_gen):
    assert server_default("auto", gen.model) == "prompt-lookup"
    assert server_default("auto", int8_gen.model) == "off"  # a verification costs several steps on int8
    assert server_default("prompt-lookup", int8_gen.model) == "prompt-lookup"
    assert server_default("off", gen.model) == "off"
    with pytest.raises(GenerationError, match="speculative 'draft' is not one of"):
        server_default("draft", gen.model)


def test_a_request_joining_mid_speculation_gets_the_text_it_gets_alone(gen):
    """A speculates alone; B arrives: both decode by plain steps from then on, and both give their texts alone."""
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, speculative="prompt-lookup")
    sched.eos = set()  # the random model may say EOS early: these rows run to max_tokens
    eng = sched._engine
    crowded = []  # rounds run while the lone row was not alone
    extend = eng.extend

    def slow_extend(tokens):  # slow rounds, so B lands while A speculates; check A is alone at each
        crowded.append(eng.rows != 1 or bool(sched.waiting))
        time.sleep(0.01)
        return extend(tokens)

    eng.extend = slow_extend
    try:
        a_ids, b_ids = ids_of(gen, 3), ids_of(gen, 4, repeat=2)
        ra, ca = request(a_ids, max_tokens=70, logprobs=2)
        sched.submit(ra)
        t0 = time.monotonic()
        while sched.stats["spec_rounds"] < 3 and not ca.done.is_set() and time.monotonic() - t0 < 30:
            time.sleep(0.001)
        rounds_before = sched.stats["spec_rounds"]
        assert rounds_before >= 3 and not ca.done.is_set(), "A did not speculate before B came"
        rb, cb = request(b_ids, max_tokens=20, logprobs=2)
        sched.submit(rb)
        wait(ca, cb)
    finally:
        sched.close()
    assert not any(crowded)
    assert rb.started_at < ra.finished_at  # B joined while A ran
    for ids, m, c in ((a_ids, 70, ca), (b_ids, 20, cb)):
        _, _, toks = alone(gen, ids, m, eos=False)
        assert c.tokens == toks
    # A's logprobs are those of the same request with speculation off
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, speculative="off")
    sched.eos = set()
    try:
        r, c = request(a_ids, max_tokens=70, logprobs=2)
        sched.submit(r)
        wait(c)
    finally:
        sched.close()
    assert sched.stats["spec_rounds"] == 0
    assert (c.tokens, c.logprobs) == (ca.tokens, ca.logprobs)


def test_speculation_stops_at_max_tokens_and_stop_strings(gen):
    """A round's kept tokens go through the same delivery: max_tokens and stop strings end the row mid-round."""
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, speculative="prompt-lookup")
    sched.eos = set()
    try:
        ids = ids_of(gen, 5)
        full, _, _ = alone(gen, ids, 40, eos=False)
        stop = (full[len(full) // 2: len(full) // 2 + 4],)
        outs = []
        for m, st in ((40, ()), (23, ()), (40, stop)):
            expect = alone(gen, ids, m, st, eos=False)
            r, c = request(ids, max_tokens=m, stop=st)
            sched.submit(r)
            wait(c)
            outs.append(((c.text, c.reason, c.tokens), expect))
    finally:
        sched.close()
    assert sched.stats["spec_accepted"] > 0
    for got, expect in outs:
        assert got == expect


def test_rounds_wait_for_a_prompt_being_prefilled(gen):
    """While a prompt is prefilled in chunks the running row takes plain steps (one round would hold the new
    prompt's next chunk as long as several steps)."""
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, speculative="prompt-lookup", prefill_chunk=8)
    sched.eos = set()
    eng = sched._engine
    ra, ca = request(ids_of(gen, 6), max_tokens=40)  # drafts from its first tokens on
    rb, cb = request(ids_of(gen, 8, repeat=10), max_tokens=10)  # prefilled in 8-token chunks while A decodes
    prefilling = []  # at each round: whether B's prompt was under way
    extend = eng.extend

    def watch(tokens):
        prefilling.append(rb.started_at is not None and rb.first_token_at is None)
        return extend(tokens)

    eng.extend = watch
    try:
        sched.submit_many([ra, rb])
        wait(ca, cb)
    finally:
        sched.close()
    assert len(rb.prompt_ids) > 48 and ra.first_token_at < rb.first_token_at  # A decoded during B's chunks
    assert prefilling and not any(prefilling)


def test_the_flag_reaches_the_scheduler(tiny_dir):
    import argparse

    from lmforge.cli.serve import build_app, register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="verb"))
    sched = build_app(p.parse_args(["serve", "--model", str(tiny_dir)])).state.lmforge.sched
    assert sched._spec.default == "prompt-lookup"  # auto, float weights
    sched = build_app(p.parse_args(["serve", "--model", str(tiny_dir), "--speculative", "off"])).state.lmforge.sched
    assert sched._spec.default == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--speculative", "draft"])


def test_no_round_without_batch_invariance(gen):
    """--batch-invariant off: a k-row forward is not k steps bit for bit there, so even prompt-lookup by name
    decodes by plain steps."""
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, batch_invariant=False, speculative="prompt-lookup")
    try:
        r, c = request(ids_of(gen, 3), max_tokens=30)
        sched.submit(r)
        wait(c)
    finally:
        sched.close()
        Scheduler(gen.model, gen.tokenizer, max_batch=16).close()  # the shared model back to invariant layers
    assert sched.stats["spec_rounds"] == 0


def test_int8_rows_asked_by_name_give_the_plain_steps_numbers(int8_gen):
    """On int8 weights (auto: off) a request may still ask for prompt lookup: 2-token matches, k from 1."""
    out = {}
    for mode in ("off", "prompt-lookup"):
        sched = Scheduler(int8_gen.model, int8_gen.tokenizer, max_batch=4, speculative=mode)
        sched.eos = set()
        try:
            r, c = request(ids_of(int8_gen, 9), max_tokens=50, logprobs=2)
            sched.submit(r)
            wait(c)
        finally:
            sched.close()
        out[mode] = (c.tokens, c.logprobs, c.text), dict(sched.stats)
    assert out["off"][0] == out["prompt-lookup"][0]
    assert out["off"][1]["spec_rounds"] == 0 < out["prompt-lookup"][1]["spec_accepted"]
