"""Server hardening (issue 14): inputs that once gave a 500, cross-site requests, and the speed figures.

Each bad input must be a 400 in OpenAI's error shape, and the server must keep answering afterwards.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import start_server, tiny_tokenizer  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.generator import Generator  # noqa: E402
from lmforge.serve import ServeSettings  # noqa: E402

JSON = {"Content-Type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "the cat sat"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Generator:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("hardening-llama")
    tok = tiny_tokenizer()
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    yield Generator.load(d)
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server(gen):
    srv = start_server(gen, settings={"max_tokens": 8, "allowed_hosts": ["myserver.lan", ".corp.example"]})
    yield srv
    srv.stop()


def _post(srv, body: bytes | dict, path: str = "/v1/chat/completions", **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers={**JSON, **headers}, timeout=30)


def _assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- inputs that were 500s -----------------------------------------------------------------------------------
NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {**CHAT, "seed": 2**70}, "seed", "less than or equal to"),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 4, "seed": -(2**70)}, "seed", "greater than or equal"),
    ("/v1/summarize", {"text": "the cat", "max_tokens": 4, "seed": 2**70}, "seed", "less than or equal to"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a \\ud800 b"}], "max_tokens": 4}',
     "messages.0.content", "lone UTF-16 surrogate"),
    ("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 4}', "prompt", "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}', "model",
     "surrogate"),
    ("/v1/embeddings", b'{"input": ["ok", "\\ud83d"]}', "input.1", "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', None, "surrogate"),
    ("/v1/chat/completions", NESTED, None, "nested deeper than"),
    ("/v1/chat/completions", b'{"messages": ' + NESTED + b"}", None, "nested deeper than"),
    ("/v1/chat/completions", b'{"stream_options": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, None, "nested deeper"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None,
     "NaN is not allowed"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', None,
     "out of range"),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", None, "digits"),
    ("/v1/chat/completions", b'{"messages": "\xff\xfe"}', None, "not valid JSON"),
    ("/v1/chat/completions", {**CHAT, "temperature": 1e-300}, "temperature", "0 (greedy) or at least"),
    ("/v1/chat/completions", {**CHAT, "temperature": 0.5, "repetition_penalty": 1e-300}, "repetition_penalty",
     "greater than or equal to 0.01"),
])
def test_former_500s_are_400s(server, path, body, param, words):
    err = _assert_error(_post(server, body, path), 400, param=param)
    assert words in err["message"], err
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_valid_extremes_still_work(server, gen):
    """The new bounds reject only what cannot run: the largest seed, 0.01 and a penalty of 100 generate."""
    r = _post(server, {**CHAT, "temperature": 0.01, "seed": 2**64 - 1, "repetition_penalty": 100.0})
    assert r.status_code == 200, r.text
    r = _post(server, {**CHAT, "seed": -(2**63), "temperature": 2.0, "repetition_penalty": 0.01})
    assert r.status_code == 200, r.text


# ---- cross-site requests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None])
def test_post_needs_json_content_type(server, ctype):
    """A page on another site can send these without a CORS preflight: refuse them (with or without Origin)."""
    headers = {"Origin": "https://evil.example"}
    if ctype is not None:
        headers["Content-Type"] = ctype
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    err = _assert_error(r, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(server.url + "/v1/chat/completions", json=CHAT,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "corp.example.evil", "[::2]"])
def test_foreign_host_is_refused(server, host):
    """DNS rebinding: evil.example resolves to 127.0.0.1, but the Host header still names it."""
    for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, server.url + path, json=CHAT, headers={"Host": host})
        err = _assert_error(r, 403, "host_not_allowed")
        assert "--allowed-hosts" in err["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1234", "[::1]:8000", "myserver.lan",
                                  "myserver.lan:80", "corp.example", "gpu1.corp.example", None])
def test_local_and_allowed_hosts_work(server, host):
    headers = {} if host is None else {"Host": host}
    assert httpx.get(server.url + "/health", headers=headers).status_code == 200
    assert _post(server, CHAT, **headers).status_code == 200


def test_any_host_with_star(gen):
    srv = start_server(gen, settings={"allowed_hosts": ["*"]})
    try:
        assert httpx.get(srv.url + "/health", headers={"Host": "anything.example"}).status_code == 200
    finally:
        srv.stop()


def test_no_cors_headers_unless_configured(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and not any(k.startswith("access-control-") for k in r.headers)
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                               "Access-Control-Request-Headers": "content-type"})
    assert not any(k.startswith("access-control-") for k in r.headers)
    assert r.status_code >= 400


def test_cors_origin_only_for_that_origin(gen):
    srv = start_server(gen, settings={"cors_origin": "https://app.example", "api_key": "k"})
    try:
        good, bad = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(srv.url + "/v1/chat/completions", headers={**good, **pre})  # no API key on a preflight
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(srv.url + "/v1/chat/completions", headers={**bad, **pre})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers={**good, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers={**bad, "Authorization": "Bearer k"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers=good)  # errors carry it too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        srv.stop()


@pytest.mark.parametrize("field, value, words", [
    ("cors_origin", "app.example", "is not an origin"),
    ("cors_origin", "https://app.example/path", "is not an origin"),
    ("allowed_hosts", ["ok.example", "bad host"], "is not a host name"),
    ("allowed_hosts", [""], "is not a host name"),
])
def test_settings_reject_bad_access_rules(field, value, words):
    with pytest.raises(LmforgeError, match=f"{field}.*{words}"):
        ServeSettings(**{field: value}).validate()


# ---- speed figures ------------------------------------------------------------------------------------------------
def _check_timings(t: dict, usage: dict) -> None:
    assert t["prompt_tokens"] == usage["prompt_tokens"] and t["completion_tokens"] == usage["completion_tokens"]
    assert 0 <= t["queue_ms"] <= t["time_to_first_token_ms"] <= t["total_ms"]
    if usage["completion_tokens"] >= 2:
        assert t["tokens_per_second"] > 0
    else:
        assert t["tokens_per_second"] is None


def test_timings_next_to_usage(server):
    body = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 8, "temperature": 0}
    r = _post(server, body).json()
    _check_timings(r["timings"], r["usage"])
    r = _post(server, {"prompt": ["the cat", "a dog ran"], "max_tokens": 6, "temperature": 0},
              "/v1/completions").json()
    _check_timings(r["timings"], r["usage"])
    r = _post(server, {"text": "the cat sat on the mat", "max_tokens": 5}, "/v1/summarize").json()
    _check_timings(r["timings"], r["usage"])
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=JSON, timeout=30,
                      content=json.dumps({**body, "stream": True,
                                          "stream_options": {"include_usage": True}}).encode()) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    last = events[-1]
    assert last["choices"] == [] and "usage" in last
    _check_timings(last["timings"], last["usage"])
