"""The OpenAI features of the server (issue 12): logprobs, n, seed, stream_options.include_usage, usage, stop,
400s for parameters lmforge does not implement, and GET /metrics.

logprobs are checked against a float32 forward pass of the whole sequence (prompt + generated tokens): the
log_softmax of its logits at each generated position, i.e. the model's own distribution, never our earlier output.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
prom_parser = pytest.importorskip("prometheus_client.parser")

from conftest import serving  # noqa: E402
from test_serve import start_server  # noqa: E402

from lmforge.decoding import GenerationConfig, generate  # noqa: E402
from lmforge.generator import Generator  # noqa: E402

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on the mat"}]
TOL = 1e-4  # float32 server path vs one float32 forward of the whole sequence (KV cache vs none)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny_dir and gen: tests/conftest.py


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, max_concurrent=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def sse_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def chat_prompt_ids(gen: Generator, messages=CHAT) -> list[int]:
    return gen.tokenizer.encode(gen.format_chat(messages), add_special_tokens=False)


def greedy_ids(gen: Generator, prompt: list[int], n: int, **gc) -> list[int]:
    out = generate(gen.model, torch.tensor([prompt]), None, GenerationConfig(max_new_tokens=n, **gc))[0]
    return [t for t in out if t not in gen.model.cfg.eos_ids]


def reference_logprobs(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """(len(new), V): log_softmax of one float32 forward of prompt + new, at the positions that predict `new`."""
    with torch.no_grad():
        ids = torch.tensor([prompt + new])
        logits = model.lm_logits(model(ids)).float()[0]  # (T, V)
    return logits.log_softmax(-1)[len(prompt) - 1: len(prompt) - 1 + len(new)]


def check_chat_logprobs(gen, content: list[dict], ref: torch.Tensor, new: list[int], k: int, tol: float) -> None:
    assert len(content) == len(new)
    for j, (entry, t) in enumerate(zip(content, new)):
        assert entry["bytes"] == list(gen.tokenizer.token_bytes(t))
        assert entry["logprob"] == pytest.approx(float(ref[j, t]), abs=tol)
        vals, ids = ref[j].topk(k)
        assert len(entry["top_logprobs"]) == k
        for alt, v, i in zip(entry["top_logprobs"], vals.tolist(), ids.tolist()):
            assert alt["logprob"] == pytest.approx(v, abs=tol)
            if alt["bytes"] != list(gen.tokenizer.token_bytes(i)):  # a near-tie may swap two alternatives
                assert abs(alt["logprob"] - float(ref[j, i])) < 10 * tol
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - tol


# ---- logprobs ----------------------------------------------------------------------------------------------
def test_chat_logprobs_match_float32_forward(server, gen):
    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt = chat_prompt_ids(gen)
    new = greedy_ids(gen, prompt, 10)
    assert r.json()["usage"]["completion_tokens"] == len(new)
    check_chat_logprobs(gen, choice["logprobs"]["content"], reference_logprobs(gen.model, prompt, new), new, 3, TOL)
    assert choice["message"]["content"] == gen.tokenizer.decode(new)


def test_logprobs_are_the_models_not_the_penalised_ones(server, gen):
    """Repetition penalty changes which token wins, not the reported distribution (the raw model's)."""
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "repetition_penalty": 1.8, "logprobs": True,
            "top_logprobs": 2}
    choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
    prompt = chat_prompt_ids(gen)
    new = greedy_ids(gen, prompt, 12, repetition_penalty=1.8)
    check_chat_logprobs(gen, choice["logprobs"]["content"], reference_logprobs(gen.model, prompt, new), new, 2, TOL)


def test_streamed_logprobs_equal_the_reply(server):
    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    events = sse_events(server, "/v1/chat/completions", {**body, "stream": True})
    content = [e for ev in events for c in ev["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    text = "".join(c["delta"].get("content", "") for ev in events for c in ev["choices"])
    assert text == whole["message"]["content"]
    assert [(e["bytes"], e["logprob"]) for e in content] == \
        [(e["bytes"], e["logprob"]) for e in whole["logprobs"]["content"]]
    assert all("usage" not in ev for ev in events)  # no include_usage: no usage field at all


def test_completions_logprobs(server, gen):
    body = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt = gen.tokenizer.encode("the cat sat", add_special_tokens=True)
    new = greedy_ids(gen, prompt, 8)
    ref = reference_logprobs(gen.model, prompt, new)
    assert lp["token_logprobs"] == pytest.approx([float(ref[j, t]) for j, t in enumerate(new)], abs=TOL)
    assert lp["tokens"] == [gen.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in new]
    assert all(len(d) <= 2 for d in lp["top_logprobs"])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(new))]
    # streamed: the same tokens, offsets continuing across chunks
    events = sse_events(server, "/v1/completions", {**body, "stream": True})
    parts = [c["logprobs"] for ev in events for c in ev["choices"] if c["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == lp["text_offset"]


def test_logprobs_with_a_quantized_model_within_tolerance(tiny_dir, int8_gen):
    """int8 weights: the reported logprobs stay within quantization error of the float32 model's forward."""
    ref_model = Generator.load(tiny_dir).model
    qgen = int8_gen
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    with serving(qgen) as srv:
        content = post(srv, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    prompt = chat_prompt_ids(qgen)
    new = greedy_ids(qgen, prompt, 8)  # the quantized model's own choices
    ref = reference_logprobs(ref_model, prompt, new)
    got = torch.tensor([e["logprob"] for e in content])
    want = torch.tensor([float(ref[j, t]) for j, t in enumerate(new)])
    assert torch.allclose(got, want, atol=0.05), (got, want)


# ---- n, seed, usage, stop ------------------------------------------------------------------------------------
def test_n3_with_seed_is_reproducible(client, server, gen):
    kw = dict(model=Path(gen.name).name, messages=CHAT, max_tokens=12, temperature=1.0, seed=1234, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # three draws, not one row copied
    c = client.chat.completions.create(**{**kw, "seed": 99})
    assert [x.message.content for x in c.choices] != texts
    # the same three while other requests are decoding, and streamed
    with httpx.Client(base_url=server.url, timeout=60) as h:
        others = [{"messages": CHAT, "max_tokens": 12, "temperature": 0.8, "n": 2} for _ in range(3)]
        with cf.ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(h.post, "/v1/chat/completions", json=o) for o in others]
            again = client.chat.completions.create(**kw)
            assert all(f.result().status_code == 200 for f in busy)
    assert [x.message.content for x in again.choices] == texts
    events = sse_events(server, "/v1/chat/completions", {**kw, "stream": True})
    streamed = ["".join(c["delta"].get("content", "") for ev in events for c in ev["choices"] if c["index"] == i)
                for i in range(3)]
    assert streamed == texts
    assert sorted(c["finish_reason"] for ev in events for c in ev["choices"] if c["finish_reason"]) == \
        sorted(x.finish_reason for x in a.choices)


def test_n_greedy_and_completions_n(server, gen):
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0, "n": 2}).json()
    want = gen.chat(CHAT, max_new_tokens=8)
    assert [c["message"]["content"] for c in r["choices"]] == [want, want]
    assert r["usage"]["prompt_tokens"] == len(chat_prompt_ids(gen))  # the prompt counts once
    r = post(server, "/v1/completions", {"prompt": ["the cat", "a dog ran"], "max_tokens": 6, "temperature": 0,
                                         "n": 2}).json()
    texts = [c["text"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    one = gen.generate(["the cat", "a dog ran"], max_new_tokens=6)
    assert texts == [one[0], one[0], one[1], one[1]]


def test_include_usage_stream(server, gen):
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(server, "/v1/chat/completions", body)
    *chunks, last = events
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    texts = ["".join(c["delta"].get("content", "") for ev in chunks for c in ev["choices"] if c["index"] == i)
             for i in range(2)]
    whole = post(server, "/v1/chat/completions", {k: v for k, v in body.items() if "stream" not in k}).json()
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert last["usage"] == whole["usage"]
    assert last["usage"]["prompt_tokens"] == len(chat_prompt_ids(gen))
    assert all(ev["usage"] is None for ev in chunks)
    events = sse_events(server, "/v1/completions", {"prompt": "the cat", "max_tokens": 5, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_usage_on_every_reply(server):
    for path, body in [("/v1/chat/completions", {"messages": CHAT, "max_tokens": 3}),
                       ("/v1/completions", {"prompt": "the cat", "max_tokens": 3}),
                       ("/v1/embeddings", {"input": "the cat"}),
                       ("/v1/summarize", {"text": "the cat sat on the mat", "max_tokens": 3})]:
        r = post(server, path, body)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["usage"]["prompt_tokens"] > 0, path


def test_stop_string_or_list(server, gen):
    base = {"prompt": "the cat", "max_tokens": 16, "temperature": 0}
    full = post(server, "/v1/completions", base).json()["choices"][0]["text"]
    assert len(full) > 3
    word = full[2:4]  # a stop string that occurs in the greedy output
    a = post(server, "/v1/completions", {**base, "stop": word}).json()["choices"][0]
    b = post(server, "/v1/completions", {**base, "stop": ["zzzz", word]}).json()["choices"][0]
    assert a["text"] == b["text"] == full[: full.index(word)]
    assert a["finish_reason"] == b["finish_reason"] == "stop"


# ---- parameters we do not implement ----------------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # chat only
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),  # without tools
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/nowhere"}}}}, "response_format"),  # the library cannot compile it
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"n": 9}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logprobs": True, "max_completion_tokens": 3}, "max_completion_tokens"),
    ("/v1/embeddings", {"tools": [{"type": "function"}]}, "tools"),
    ("/v1/summarize", {"stream": True}, "stream"),
])
def test_unsupported_parameters_are_400(server, path, extra, param):
    base = {"/v1/chat/completions": {"messages": CHAT, "max_tokens": 3}, "/v1/completions": {"prompt": "the cat",
            "max_tokens": 3}, "/v1/embeddings": {"input": "the cat"},
            "/v1/summarize": {"text": "the cat sat", "max_tokens": 3}}[path]
    r = post(server, path, {**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"], err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
                                   {"logit_bias": {}}, {"user": "u-1"}, {"metadata": {"a": "b"}}, {"store": False},
                                   {"modalities": ["text"]}, {"parallel_tool_calls": False},
                                   {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}])
def test_no_op_values_are_accepted(server, extra):
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


# ---- /metrics ----------------------------------------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in prom_parser.text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for(url: str, keys: list[tuple], timeout: float = 5.0) -> dict:
    """The Gate records a request after its last byte is sent: poll briefly for the counts to arrive."""
    t0 = time.monotonic()
    while True:
        m = scrape(url)
        if all(m.get(k, 0) >= 1 for k in keys) or time.monotonic() - t0 > timeout:
            return m
        time.sleep(0.02)


def test_metrics_parse_and_move(gen):
    srv = start_server(gen)
    other = start_server(gen)  # a second app in the same process: its own registry, its own counts
    try:
        ep = ("endpoint", "/v1/chat/completions")
        ok = ("lmforge_requests_total", (ep, ("status", "200")))
        before = scrape(srv.url)
        assert before.get(ok, 0) == 0
        assert ("lmforge_queue_depth", ()) in before and ("lmforge_running", ()) in before
        r = post(srv, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "temperature": 0, "n": 2}).json()
        assert post(srv, "/v1/chat/completions", {"messages": CHAT, "tools": [{"x": 1}]}).status_code == 400
        after = wait_for(srv.url, [ok, ("lmforge_requests_total", (ep, ("status", "400")))])
        assert after[ok] == 1
        assert after[("lmforge_requests_total", (ep, ("status", "400")))] == 1
        assert after[("lmforge_prompt_tokens_total", (ep,))] == r["usage"]["prompt_tokens"]
        assert after[("lmforge_completion_tokens_total", (ep,))] == r["usage"]["completion_tokens"]
        assert after[("lmforge_time_to_first_token_seconds_count", ())] == 2  # one per choice
        assert after[("lmforge_batch_size_count", ())] == 1
        assert after[("lmforge_batch_size_sum", ())] == 2  # both choices in one batch
        assert after[("lmforge_request_duration_seconds_count", (ep,))] == 2
        assert after[("lmforge_queue_depth", ())] == 0
        assert scrape(other.url).get(ok, 0) == 0
    finally:
        srv.stop()
        other.stop()
