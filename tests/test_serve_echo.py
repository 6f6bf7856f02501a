"""/v1/completions with echo (issue 37): the prompt's own token log-probabilities, as lm-evaluation-harness asks
for them (`echo: true`, `logprobs: 1`, `max_tokens: 0` or 1, temperature 0, prompts as text or token ids).

Checked against one float32 forward of each prompt alone (log_softmax of its logits), never our earlier output;
prompts of different lengths in one request exercise the padded scoring batch.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import serving  # noqa: E402

from lmforge.generator import Generator  # noqa: E402

TOL = 1e-4  # float32 scoring batch (padded) vs one float32 forward of the prompt alone
PROMPTS = ["the cat sat on the mat", "a dog", "the quick brown fox jumps over the lazy dog and the cat"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny_dir and gen: tests/conftest.py


@pytest.fixture(scope="module")
def server(gen):
    with serving(gen, max_concurrent=4) as srv:
        yield srv


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): log_softmax of one float32 forward of `ids` alone; row j predicts token j + 1."""
    with torch.no_grad():
        return model.lm_logits(model(torch.tensor([ids]))).float()[0].log_softmax(-1)


def check_echo(gen, lp: dict, ids: list[int], k: int, tol: float, model=None) -> None:
    """lp covers `ids` (first entry null); each later entry is the reference log-probability of its token."""
    ref = forward_logprobs(model or gen.model, ids)
    assert lp["tokens"][: len(ids)] == [gen.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1: len(ids)])
    want = torch.tensor([float(ref[j, t]) for j, t in enumerate(ids[1:])])
    assert torch.allclose(got, want, atol=tol), (got, want)
    for j in range(1, len(ids)):
        top = lp["top_logprobs"][j]
        assert len(top) <= k
        want_top: dict[str, float] = {}  # by text, the more likely of two tokens with one text
        for v, i in zip(*ref[j - 1].topk(k)):
            want_top.setdefault(gen.tokenizer.token_bytes(int(i)).decode("utf-8", "replace"), float(v))
        assert top.keys() == want_top.keys() or len(set(want_top.values())) < len(want_top)  # unless a tie
        assert sorted(top.values()) == pytest.approx(sorted(want_top.values()), abs=tol)


def test_echo_max_tokens_0_scores_each_prompt(server, gen):
    r = post(server, {"prompt": PROMPTS, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    n_in = 0
    for p, c in zip(PROMPTS, out["choices"]):
        ids = gen.tokenizer.encode(p, add_special_tokens=True)
        n_in += len(ids)
        assert c["text"] == p and c["finish_reason"] == "length"
        assert len(c["logprobs"]["tokens"]) == len(ids)
        check_echo(gen, c["logprobs"], ids, 2, TOL)
        # text_offset: characters of the echoed text before each token (a BOS takes none)
        special = set(gen.tokenizer.all_special_ids)
        offs = [sum(len(t) for t, i in zip(c["logprobs"]["tokens"][:j], ids) if i not in special)
                for j in range(len(ids))]
        assert c["logprobs"]["text_offset"] == offs
    assert out["usage"] == {"prompt_tokens": n_in, "completion_tokens": 0, "total_tokens": n_in}


def test_token_id_prompts_as_lm_eval_sends_them(server, gen):
    """lm-eval's local-completions payload: token ids, echo, logprobs 1, max_tokens 1, temperature 0, a seed; it
    reads token_logprobs[ctxlen:-1], so the list must be the prompt's tokens plus exactly one generated token."""
    rows = [gen.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    body = {"model": gen.name, "prompt": rows, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "seed": 1234}
    r = post(server, body)
    assert r.status_code == 200, r.text
    for ids, c in zip(rows, r.json()["choices"]):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        check_echo(gen, lp, ids, 1, TOL)
        ref = forward_logprobs(gen.model, ids)[-1]
        assert lp["token_logprobs"][-1] == pytest.approx(float(ref.max()), abs=TOL)  # greedy: the argmax
        assert c["text"].startswith(gen.tokenizer.decode(ids))
    # one prompt given as a flat list of ids is one prompt
    one = post(server, {**body, "prompt": rows[0], "max_tokens": 0}).json()["choices"]
    assert len(one) == 1 and len(one[0]["logprobs"]["tokens"]) == len(rows[0])


def test_echo_with_generation_and_stream(server, gen):
    body = {"prompt": PROMPTS[0], "echo": True, "logprobs": 3, "max_tokens": 6, "temperature": 0}
    whole = post(server, body).json()["choices"][0]
    ids = gen.tokenizer.encode(PROMPTS[0], add_special_tokens=True)
    assert whole["text"].startswith(PROMPTS[0])
    plain = post(server, {**body, "echo": False}).json()["choices"][0]
    assert whole["text"] == PROMPTS[0] + plain["text"]
    lp = whole["logprobs"]
    check_echo(gen, lp, ids, 3, TOL)
    assert lp["token_logprobs"][len(ids):] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-6)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    parts = [c for ev in events for c in ev["choices"]]
    assert "".join(c["text"] for c in parts) == whole["text"]
    streamed = [x for c in parts if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    assert [x for c in parts if c["logprobs"] for x in c["logprobs"]["text_offset"]] == lp["text_offset"]


def test_echo_errors_name_the_parameter(server, gen):
    r = post(server, {"prompt": "the cat", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(server, {"prompt": [1, 2, 10_000], "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, {"prompt": "the cat", "echo": True, "max_tokens": 0, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = post(server, {"prompt": "the cat", "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    # echo without logprobs: the prompt text comes back, no logprobs
    c = post(server, {"prompt": "the cat", "echo": True, "max_tokens": 0}).json()["choices"][0]
    assert c["text"] == "the cat" and c["logprobs"] is None


def test_echo_on_a_quantized_model_within_tolerance(tiny_dir, int8_gen):
    """int8 weights: the prompt's logprobs stay within quantization error of the float32 model's forward."""
    ref_model = Generator.load(tiny_dir).model
    qgen = int8_gen
    with serving(qgen) as srv:
        r = post(srv, {"prompt": PROMPTS, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text
    for p, c in zip(PROMPTS, r.json()["choices"]):
        ids = qgen.tokenizer.encode(p, add_special_tokens=True)
        ref = forward_logprobs(ref_model, ids)
        got = torch.tensor(c["logprobs"]["token_logprobs"][1:])
        want = torch.tensor([float(ref[j, t]) for j, t in enumerate(ids[1:])])
        assert torch.allclose(got, want, atol=0.05), (got, want)


def test_scoring_runs_on_the_worker_between_decode_steps(server, gen, monkeypatch):
    """Echo requests are scored on the scheduler's thread (the one that owns the model) while another request
    decodes; both answers are what each gives alone."""
    import concurrent.futures as cf
    import threading

    from lmforge.serve import batching

    threads = []
    real = batching.score_prompts

    def spy(*a, **kw):
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(batching, "score_prompts", spy)
    long = {"prompt": "the dog ran", "max_tokens": 48, "temperature": 0}
    alone = post(server, long).json()["choices"][0]["text"]
    body = {"prompt": PROMPTS, "echo": True, "logprobs": 1, "max_tokens": 0}
    with cf.ThreadPoolExecutor(2) as pool:
        gen_f = pool.submit(post, server, long)
        echoes = [post(server, body) for _ in range(3)]
        assert gen_f.result().json()["choices"][0]["text"] == alone
    assert threads and set(threads) == {"lmforge-generate"}
    for r in echoes:
        assert r.status_code == 200
        for p, c in zip(PROMPTS, r.json()["choices"]):
            check_echo(gen, c["logprobs"], gen.tokenizer.encode(p, add_special_tokens=True), 1, TOL)
