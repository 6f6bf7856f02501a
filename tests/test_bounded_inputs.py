"""Untrusted inputs that cannot exhaust the machine (issue 36): chat templates render under a time and size limit,
data rows are cut before they are tokenized, and the smaller cases of item 9 each give one clear line."""

from __future__ import annotations

import json
import logging
import socket
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from lmforge.cli import main
from lmforge.data import bounds, readers
from lmforge.data import tokens as T
from lmforge.errors import DataError, TokenizerError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat_template import MIN_OUTPUT_CHARS, render_chat_template

WORDS = "the cat sat on a mat and dog ran far away from home".split()
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a cat?"}]
GOOD = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
REPEAT_BOMB = "{% for i in range(100) %}{{ (messages*100000)|string }}{% endfor %}"  # reached 10.2 GB
NESTED = ("{% for a in messages*1000 %}{% for b in messages*1000 %}{% for c in messages*1000 %}BODY"
          "{% endfor %}{% endfor %}{% endfor %}")  # ran past 60 s at 4.3 GB


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    t = Tokenizer.train_bpe(corpus, vocab_size=300, min_frequency=1)
    t.chat_template = GOOD
    return t


def _bounded(fn, seconds: float = 5.0, mib: float = 64.0) -> Exception | None:
    """Run fn() twice -> the exception it raised: within `seconds`, then (slowed by tracemalloc, so only the memory
    counts) with Python allocations peaking under `mib` MiB."""
    def run() -> Exception | None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- returned to the test
            return e
        return None

    t0 = time.perf_counter()
    err = run()
    dt = time.perf_counter() - t0
    assert dt < seconds, f"took {dt:.1f}s"
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mib * 2**20, f"peak {peak / 2**20:.0f} MiB"
    return err


# ---- 4: chat templates under limits -----------------------------------------------------------------------------
@pytest.mark.parametrize("template, cause", [
    (REPEAT_BOMB, f"over the output limit of {MIN_OUTPUT_CHARS:,} characters"),
    ("{% for i in range(100) %}{{ (messages[:1]*50000)|string }}{% endfor %}", "output limit"),  # one repeat fits
    (NESTED.replace("BODY", ""), "time limit of 2 s"),  # no output at all: only the deadline stops it
    (NESTED.replace("BODY", "{{ c }}"), "output limit"),
    ("{% macro m() %}" + NESTED.replace("BODY", "{{ c.content * 100 }}") + "{% endmacro %}{{ m()|length }}",
     "output limit"),  # a macro's buffer, never streamed
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "'~' concatenation"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "output limit"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l|string }}", "limit"),  # shared references: 2**64 items as text
    ("{{ 'x'|center(10**9) }}", "the center filter"),
    ("{{ 'x'.ljust(10**9) }}", "output limit"),
    ("{{ ('x' * 10**6).replace('x', 'yyyyyyyyyy') }}", "str.replace()"),
    ("{{ ('x' * 10**6)|replace('x', 'yyyyyyyyyy') }}", "the replace filter"),
    ("{{ '%0999999999d' % 1 }}", "%-formatted string"),
    ("{{ '{:>999999999}'.format(1) }}", "str.format()"),
    ("{{ ('y' * 1000)|join('x' * 100000) }}", "the join filter"),
    ('{{ ("y\\n" * 100000)|indent("x" * 100) }}', "the indent filter"),
])
def test_hostile_template_stops_quickly_with_one_line(tok, template, cause):
    err = _bounded(lambda: tok.apply_chat_template(MSGS, chat_template=template))
    assert isinstance(err, TokenizerError), err
    msg = str(err)
    assert "\n" not in msg and msg.startswith("the chat_template argument failed to render: "), msg
    assert cause in msg, msg


def test_model_template_error_names_the_tokenizer_and_limits_are_parameters(tok):
    tok.chat_template = REPEAT_BOMB
    try:
        with pytest.raises(TokenizerError, match=r"chat_template failed to render: .*output limit") as e:
            tok.apply_chat_template(MSGS)
        assert str(e.value).startswith(f"{tok.source}: chat_template")
    finally:
        tok.chat_template = GOOD
    assert tok.apply_chat_template(MSGS) == "<|system|>You are terse.\n<|user|>What is a cat?\n<|assistant|>"
    ctx = {"messages": MSGS, "add_generation_prompt": False}
    with pytest.raises(TokenizerError, match="over the output limit of 20 characters"):
        render_chat_template(GOOD, ctx, "t", max_chars=20)
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match=r"^t failed to render: stopped at the time limit of 0.2 s$"):
        render_chat_template(NESTED.replace("BODY", ""), ctx, "t", time_limit=0.2)
    assert time.perf_counter() - t0 < 2
    # the default limit grows with the input: a 5 MB message renders
    big = [{"role": "user", "content": "word " * 1_000_000}]
    assert len(render_chat_template(GOOD, {"messages": big}, "t")) == 5_000_000 + len("<|user|>\n")


def test_real_templates_render_as_before(tok):
    """Loops, macros, namespaces, tojson and str methods as real templates use them, under the limits."""
    template = ("{%- set ns = namespace(sys='') -%}{%- macro fmt(m) -%}[{{ m.role|upper }}] {{ m.content|trim }}"
                "{%- endmacro -%}{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.sys = m.content -%}"
                "{%- else -%}{{ fmt(m) }}{{ '\\n' }}{%- endif -%}{%- endfor -%}{{ ns.sys.replace('terse', 'brief') }}"
                "|{{ tools|tojson }}|{{ (messages|map(attribute='role')|list)|join(',') }}|{{ '%s-%d' % ('a', 3) }}"
                "|{{ '{}!'.format('ok') }}|{% for a, b in [(1, 2)] %}{{ a ~ b }}{% endfor %}")
    out = tok.apply_chat_template(MSGS, chat_template=template, tools=[{"name": "f"}])
    assert out == '[USER] What is a cat?\nYou are brief.|[{"name": "f"}]|system,user|a-3|ok!|12'


def _tiny_model_dir(d: Path, tok: Tokenizer, template: str | None = GOOD) -> Path:
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    old, tok.chat_template = tok.chat_template, template
    try:
        tok.save(d)
    finally:
        tok.chat_template = old
    return d


def test_cli_exits_2_and_server_answers_400_on_a_hostile_template(tok, tmp_path, capsys):
    d = _tiny_model_dir(tmp_path / "m", tok, REPEAT_BOMB)
    capsys.readouterr()  # transformers' progress bar
    rc = main(["generate", "--model", str(d), "--chat", "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "chat_template failed to render" in err and "output limit" in err, err

    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from lmforge.generator import Generator
    from lmforge.serve import BackgroundServer, ServeSettings, create_app

    srv = BackgroundServer(create_app(Generator.load(d), settings=ServeSettings(max_tokens=4))).start()
    try:
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=30)
        assert time.perf_counter() - t0 < 10
        assert r.status_code == 400, r.text
        assert "output limit" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    finally:
        srv.stop()


# ---- 5: data rows cut before tokenizing -------------------------------------------------------------------------
class _Spy:
    """Records the longest text a tokenizer's encode_batch was handed."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_batch(self, texts, **kw):
        self.longest = max([self.longest, *(len(t) for t in texts), *(len(p) for p in kw.get("pairs") or [])])
        return self.tok.encode_batch(texts, **kw)


def test_huge_row_is_cut_before_tokenizing(tok, tmp_path):
    from lmforge.tasks.classify import encode

    words = 4_000_000  # 8 M characters: under the 10 M field limit, ~4 M tokens if tokenized whole
    f = tmp_path / "d.jsonl"
    with f.open("w") as fh:
        fh.write(json.dumps({"text": "a " * words, "label": "x"}) + "\n")
        fh.write(json.dumps({"text": "the cat sat", "label": "y"}) + "\n")
    spy = _Spy(tok)
    t0 = time.perf_counter()
    examples = readers.read_examples(f).examples
    feats = encode(spy, examples, {"x": 0, "y": 1}, 64)
    assert time.perf_counter() - t0 < 10
    assert spy.longest <= 64 * bounds.CHARS_PER_TOKEN, spy.longest  # never the 8 M characters
    whole = tok.encode_batch(["a " * 200], max_length=64, padding=False, return_tensors=None)["input_ids"][0]
    assert feats[0]["input_ids"] == whole and len(whole) == 64
    assert feats[1]["input_ids"] == tok.encode_batch(["the cat sat"], padding=False,
                                                     return_tensors=None)["input_ids"][0]


def test_cut_is_verified_when_the_tokenizer_drops_text():
    """A text whose first characters give no tokens (whitespace a word-level tokenizer drops) is cut longer, so
    the kept tokens are those of the whole text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wl = Tokenizer(backend)
    text = " " * 50_000 + " ".join(WORDS * 2000)
    seen = []

    def count(texts):
        seen.extend(len(t) for t in texts)
        return [len(wl.encode(t, add_special_tokens=False)) for t in texts]

    [cut] = bounds.clip_for_tokens([text], 64, count)
    assert len(cut) < len(text) and max(seen) < 200_000
    assert wl.encode(cut)[:64] == wl.encode(text)[:64]
    assert bounds.clip_for_tokens(["short text"], 64, count) == ["short text"]
    assert bounds.clip_text("aaaa bbbb cccc", 12) == "aaaa bbbb"


def test_field_over_the_hard_limit_is_refused_naming_file_row_field(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_FIELD_CHARS", 1000)
    f = tmp_path / "d.jsonl"
    rows = [{"text": "ok", "label": "a"}, {"text": "w " * 600, "label": "b"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        readers.read_examples(f)
    msg = str(e.value)
    assert msg == (f"{f}: line 2: field 'text' holds 1,200 characters, over the limit of 1,000 for one text "
                   "(split the document or drop the row)")
    c = tmp_path / "d.csv"
    c.write_text("text,pair,label\nok,ok,a\nok," + "w" * 1001 + ",b\n")
    with pytest.raises(DataError, match=r"d.csv: line 3: field 'pair' holds 1,001 characters"):
        readers.read_examples(c, text_pair_column="pair")


def test_pretraining_splits_a_file_without_newlines(tok, tmp_path):
    """A one-line file reaches the tokenizer in pieces cut before spaces, and gives the whole text's tokens."""
    text = " ".join(WORDS[(i * 5) % len(WORDS)] + ("  x" if i % 97 == 0 else "") for i in range(200_000))
    f = tmp_path / "one-line.txt"
    f.write_text(text)
    seen = []

    class Backend:
        def encode_batch(self, pieces, **kw):
            seen.extend(len(p) for p in pieces)
            return tok.backend.encode_batch(pieces, **kw)

    class Spy:
        backend = Backend()

    ids, chars = T._tokenize_file(f, Spy(), np.dtype(np.uint16))
    assert chars == len(text) and max(seen) <= T._LONG_LINE * T._PIECE_CHARS
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)


# ---- 9: the smaller items ---------------------------------------------------------------------------------------
def test_malformed_tokenizer_json_is_an_error_and_info_exits_2(tok, tmp_path, capsys):
    d = _tiny_model_dir(tmp_path / "m", tok)
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    with pytest.raises(TokenizerError, match=r"tokenizer.json: invalid JSON"):
        Tokenizer.from_dir_if_present(d)
    capsys.readouterr()  # transformers' progress bar
    rc = main(["info", str(d), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{d / 'tokenizer.json'}: invalid JSON" in err and "no tokenizer" not in err, err
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink()
    assert Tokenizer.from_dir_if_present(d) is None  # no tokenizer files: still a model
    assert main(["info", str(d), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] is False


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": "2"}, "max_tokens"),
    ({"n": True}, "n"),
    ({"seed": False}, "seed"),
    ({"stream": 1}, "stream"),
    ({"temperature": True}, "temperature"),
    ({"logprobs": 1}, "logprobs"),
])
def test_wrong_json_types_are_a_400_naming_the_field(body, param):
    from lmforge.serve.errors import ApiError
    from lmforge.serve.schemas import ChatRequest, SummarizeRequest, parse_request

    raw = json.dumps({"messages": MSGS, **body}).encode()
    with pytest.raises(ApiError) as e:
        parse_request(raw, ChatRequest)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert e.value.message.startswith(f"'{param}': "), e.value.message
    ok = parse_request(json.dumps({"messages": MSGS, "max_tokens": 3, "temperature": 1, "seed": 7}).encode(),
                       ChatRequest)
    assert ok.max_tokens == 3 and ok.temperature == 1.0  # an integer is a valid float
    with pytest.raises(ApiError, match="'max_tokens'"):
        parse_request(b'{"text": "the cat", "max_tokens": true}', SummarizeRequest)


def test_labels_differing_only_by_case_warn_once(tmp_path, monkeypatch):
    from lmforge.tasks import classify
    from lmforge.train import TrainConfig

    f = tmp_path / "d.jsonl"
    rows = [{"text": f"text {i}", "label": ["POS", "pos", "neg", "Neg", "other"][i % 5]} for i in range(50)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert readers.case_collisions(["POS", "pos", "neg", "Neg", "other"]) == [["Neg", "neg"], ["POS", "pos"]]

    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    monkeypatch.setattr(classify, "build_model", stop)
    logs: list[str] = []
    with pytest.raises(Stop):
        classify.train(classify.ClassifyConfig(data=str(f)), TrainConfig(output_dir=tmp_path / "run"),
                       log=logs.append)
    warned = [m for m in logs if "differ only by case" in m]
    assert warned == ["warning: labels 'Neg', 'neg' differ only by case; they train as 2 separate classes (make "
                      "them one spelling in the data to merge them)",
                      "warning: labels 'POS', 'pos' differ only by case; they train as 2 separate classes (make "
                      "them one spelling in the data to merge them)"]


def test_numbers_in_text_fields_warn_once_naming_file_row_field(tmp_path, caplog):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": "a"}\n{"text": 12345, "label": "b"}\n{"text": 7.5, "label": 1}\n')
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        r = readers.read_examples(f)
    assert [e.text for e in r.examples] == ["fine", "12345", "7.5"] and r.examples[2].label == "1"
    warned = [rec.getMessage() for rec in caplog.records if "holds a number" in rec.getMessage()]
    assert warned == [f"{f}: line 2: field 'text' (12345) holds a number, not text; it is used as the text "
                      "(and 1 more row(s))"]


def test_extra_safetensors_files_are_named_in_one_warning(tmp_path, caplog):
    from safetensors.torch import save_file

    from lmforge.checkpoints.hf import read_state_dict

    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model.safetensors"))
    save_file({"b": torch.ones(2)}, str(d / "model-copy.safetensors"))
    save_file({"c": torch.ones(2)}, str(d / "adapter_model.safetensors"))  # LoRA adapters: expected there
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert set(read_state_dict(d)) == {"a"}
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"{d}: ignoring model-copy.safetensors (not loaded: the weights come from model.safetensors)"]

    caplog.clear()
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert set(read_state_dict(d)) == {"a"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{d}: ignoring model-copy.safetensors (not loaded: the weights come from the shards "
        "model.safetensors.index.json names)"]
    caplog.clear()
    (d / "model-copy.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        read_state_dict(d)
    assert not caplog.records


def test_partial_http_header_is_closed_within_the_timeout(monkeypatch):
    pytest.importorskip("uvicorn")
    fastapi = pytest.importorskip("fastapi")
    from lmforge.serve import BackgroundServer, middleware

    monkeypatch.setattr(middleware, "HEADER_TIMEOUT_S", 0.5)
    app = fastapi.FastAPI()
    app.get("/ping")(lambda: {"ok": True})
    with BackgroundServer(app) as srv:
        def closed_after(first: bytes, then: bytes) -> float:
            with socket.create_connection((srv.host, srv.port), timeout=5) as s:
                s.sendall(first)
                if first:  # the response may arrive in several segments (headers, then body)
                    got = b""
                    while b'{"ok":true}' not in got:
                        chunk = s.recv(65536)
                        assert chunk, f"connection closed before the whole response: {got!r}"
                        got += chunk
                t0 = time.perf_counter()
                s.sendall(then)
                assert s.recv(65536) == b""  # closed by the server (a socket.timeout fails the test)
                return time.perf_counter() - t0

        partial = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        assert closed_after(b"", partial) < 3  # a new connection's first request
        full = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert closed_after(full, partial) < 3  # the next request on a keep-alive connection
        with socket.create_connection((srv.host, srv.port), timeout=5) as s:  # a whole request is answered
            s.sendall(full)
            assert b"200 OK" in s.recv(65536)
