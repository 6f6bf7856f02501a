"""Property-based fuzzing of the server (issue 14): whatever the body, never a 5xx, and the server stays up.

Requests are generated from the request schemas themselves (each field: a plausible value of its type or junk,
strings with lone surrogates and control characters, huge and negative numbers), plus raw bodies (random bytes,
deep nesting, broken JSON, wrong content types). A tiny random model and max_tokens <= 4 keep it fast.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

import pytest
import torch
from conftest import make_hf_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from test_serve import start_server, tiny_tokenizer  # noqa: E402

from lmforge.generator import Generator  # noqa: E402
from lmforge.serve import schemas  # noqa: E402
from lmforge.tasks.classify import LoadedClassifier  # noqa: E402

EXAMPLES = 520
ENDPOINTS = {"/v1/chat/completions": schemas.ChatRequest, "/v1/completions": schemas.CompletionRequest,
             "/v1/embeddings": schemas.EmbeddingRequest, "/v1/classify": schemas.ClassifyRequest,
             "/v1/summarize": schemas.SummarizeRequest, "/v1/translate": schemas.TranslateRequest,
             "/v1/answer": schemas.AnswerRequest}
NASTY = ["\ud800", "\udfff", "\x00", "\u202e", "😀", "{{ 7*7 }}", "{% for x in range(9) %}x{% endfor %}", "<|user|>",
         "\\", '"', "\n", "é", " "]

words = st.sampled_from(NASTY + ["the", "cat", "sat"])
text = st.one_of(st.text(max_size=40), st.lists(words, max_size=8).map("".join))
ints = st.one_of(st.integers(-3, 12), st.integers(-(2**80), 2**80), st.sampled_from([2**63, 2**64, -(2**63) - 1]))
floats = st.one_of(st.floats(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, 1e-300, 5e-324, 1e308, -0.0, 0.009, 0.01]))
junk = st.recursive(st.none() | st.booleans() | ints | floats | text,
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3), max_leaves=8)


def for_type(tp: Any) -> st.SearchStrategy:
    """Well-typed, mostly in-range values of annotation `tp` (junk comes in separately, see schema_requests)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[for_type(a) for a in args])
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(for_type(args[0]), min_size=1, max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), st.booleans(), max_size=2)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return for_model(tp)
    return {str: st.one_of(st.text(max_size=30), st.lists(st.sampled_from(["the", "cat", "sat"]), min_size=1,
                                                          max_size=6).map(" ".join)),
            int: st.integers(1, 4), float: st.floats(0.0, 1.0), bool: st.booleans(), type(None): st.none()}[tp]


def for_model(model: type[BaseModel]) -> st.SearchStrategy:
    """Dicts with every required field and, now and then, an optional one (by their JSON names)."""
    required = {(f.alias or n): for_type(f.annotation) for n, f in model.model_fields.items() if f.is_required()}
    optional = {(f.alias or n): st.one_of(st.just(f.default), for_type(f.annotation))
                for n, f in model.model_fields.items() if not f.is_required()}
    rare = st.integers(0, 7).map(lambda i: i == 0)  # each optional field in about one request in eight

    @st.composite
    def body(draw) -> dict:
        out = {k: draw(v) for k, v in required.items()}
        out.update({k: draw(v) for k, v in optional.items() if draw(rare)})
        return out

    return body()


@st.composite
def schema_requests(draw) -> tuple[str, bytes, str]:
    """A well-formed request for an endpoint, and in half of them one field (or an unknown one) set to junk."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    model = ENDPOINTS[path]
    body = draw(for_model(model))
    if draw(st.booleans()):
        names = [f.alias or n for n, f in model.model_fields.items()]
        body[draw(st.sampled_from([*names, *schemas.NOT_IMPLEMENTED]) | text)] = draw(junk)  # and tools, ...
    return path, json.dumps(body).encode(), "application/json"  # ensure_ascii: surrogates travel as \udXXX


@st.composite
def raw_requests(draw) -> tuple[str, bytes, str]:
    path = draw(st.sampled_from([*sorted(ENDPOINTS), "/v1/models", "/nothing"]))
    depth = draw(st.integers(1, 3000))
    body = draw(st.one_of(
        st.binary(max_size=64),
        text.map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.just(b"[" * depth + b"]" * depth),
        st.just(b'{"messages": ' + b"[" * depth),
        st.just(b'{"prompt": ' + b'{"a": ' * depth + b"1" + b"}" * (depth + 1)),
        junk.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"NaN", b"-Infinity", b'{"prompt": 1e400}', b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}",
                         b'{"prompt": "\\ud800"}', b"\xef\xbb\xbf{}", b'{"a":1,"a":2}', b"null", b""]),
    ))
    ctype = draw(st.sampled_from(["application/json", "application/json", "text/plain", "", "application/JSON;x=y"]))
    return path, body, ctype


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("fuzz-llama")
    tok = tiny_tokenizer()
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    gen = Generator.load(d)
    from lmforge.model.heads import SequenceClassifier

    head = SequenceClassifier(Generator.load(d).model, 2).eval()
    classifier = LoadedClassifier(head, gen.tokenizer, ["neg", "pos"], "transformer", 32)
    srv = start_server(gen, classifier=classifier,
                       settings={"max_tokens": 4, "default_max_tokens": 4, "max_body_bytes": 200_000})
    yield srv
    srv.stop()
    torch.set_num_threads(n)


def _check(r: httpx.Response, lines: list[str]) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    for line in lines:  # a stream must not end in an error event either
        assert '"server_error"' not in line, line


def test_fuzz_never_5xx(fuzz_server):
    seen: list[int] = []
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(req=st.one_of(schema_requests(), schema_requests(), raw_requests()))
        def one(req: tuple[str, bytes, str]) -> None:
            path, body, ctype = req
            headers = {"Content-Type": ctype} if ctype else {}
            with client.stream("POST", path, content=body, headers=headers) as r:
                if r.headers.get("content-type", "").startswith("text/event-stream"):
                    lines = list(r.iter_lines())
                else:
                    lines = [r.read().decode()]
            _check(r, lines)
            seen.append(r.status_code)

        one()
        health = client.get("/health")
    assert len(seen) >= 500
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["generation"]["running"] + health.json()["generation"]["waiting"] == 0
    counts = {s: seen.count(s) for s in sorted(set(seen))}
    print("fuzz statuses:", counts)
    assert counts.get(200, 0) >= 25 and counts.get(400, 0) >= 100, counts  # both paths were exercised
