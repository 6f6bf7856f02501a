"""response_format (json_object, json_schema) in the server (issue 37): through the official openai client's
`chat.completions.parse` with a pydantic model, in /v1/completions, next to free rows in the continuous batch, and
its errors (a schema the library cannot compile is a 400 naming it; a cut output says finish_reason "length")."""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from structured_schemas import SCHEMAS  # noqa: E402
from test_constraints import biased, tiny_constrained_dir  # noqa: E402

from lmforge.generator import Generator  # noqa: E402
from lmforge.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)
    tags: list[str] = pydantic.Field(max_length=3)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    gen = biased(Generator.load(tiny_constrained_dir(tmp_path_factory.mktemp("structured-serve"))))
    settings = ServeSettings(max_tokens=256, default_max_tokens=128, max_concurrent=8, model_name="m")
    app = create_app(gen, settings=settings)
    srv = BackgroundServer(app).start()
    yield srv, app, gen
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content: str, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def test_parse_with_a_pydantic_model(client):
    for temperature in (0.0, 1.0):
        r = client.chat.completions.parse(model="m", messages=[{"role": "user", "content": "a person"}],
                                          response_format=Person, temperature=temperature, seed=5)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(msg.parsed, Person), msg.content
        jsonschema.validate(json.loads(msg.content), Person.model_json_schema())


def test_json_object_and_schemas_in_chat_and_completions(client):
    r = chat(client, "anything", response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for name, schema in SCHEMAS[:10]:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
        c = chat(client, name, response_format=fmt, temperature=1.0, seed=1, n=2)
        for ch in c.choices:
            assert ch.finish_reason == "stop"
            jsonschema.validate(json.loads(ch.message.content), schema)
        p = client.completions.create(model="m", prompt=f"fill in {name}", temperature=0, max_tokens=200,
                                      extra_body={"response_format": fmt})
        assert p.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(p.choices[0].text), schema)


def test_streamed(client):
    schema = SCHEMAS[9][1]
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": schema}}
    pieces, finish = [], None
    for ev in chat(client, "a book", response_format=fmt, temperature=0, stream=True):
        if ev.choices:
            pieces.append(ev.choices[0].delta.content or "")
            finish = ev.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(pieces)), schema)


def test_free_row_in_a_constrained_batch(served, client):
    """Free greedy rows next to constrained rows in the same continuous batch: each free text equals its text
    alone."""
    _, app, _ = served
    prompts = ["the cat sat", "a dog ran on the mat"]
    alone = [chat(client, p, temperature=0, max_tokens=24).choices[0].message.content for p in prompts]
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0][1]}}
    sched = app.state.lmforge.sched
    sched.stats["max_rows"] = 0
    with cf.ThreadPoolExecutor(6) as pool:
        cons = [pool.submit(chat, client, f"person {i}", response_format=fmt, temperature=0.7, seed=i)
                for i in range(4)]
        free = [pool.submit(chat, client, p, temperature=0, max_tokens=24) for p in prompts]
        free_texts = [f.result().choices[0].message.content for f in free]
        for f in cons:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), SCHEMAS[0][1])
    assert sched.stats["max_rows"] >= 2  # they did share a batch
    assert free_texts == alone


@pytest.mark.parametrize("mode", ["thread", "batched", "row"])
def test_constrained_batch_equals_the_decode_loop(served, client, mode):
    """Greedy constrained rows sharing the server's batch (their masks filled together, on the mask thread or in
    line, then one masked argmax; or each row its own) give the texts the Python API's decode loop gives each
    alone (per-row masks, no server)."""
    _, app, gen = served
    schemas = [s for _, s in SCHEMAS[:4]]
    alone = [gen.generate(f"fill in {i}", json_schema=s, max_new_tokens=60) for i, s in enumerate(schemas)]
    sched = app.state.lmforge.sched
    sched.stats["max_rows"] = 0
    sched.mask_mode = mode
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(client.completions.create, model="m", prompt=f"fill in {i}", temperature=0,
                            max_tokens=60, extra_body={"response_format": {
                                "type": "json_schema", "json_schema": {"name": "x", "schema": s}}})
                for i, s in enumerate(schemas)]
        texts = [f.result().choices[0].text for f in futs]
    sched.mask_mode = "auto"
    assert sched.stats["max_rows"] >= 2  # they did share a batch
    assert texts == alone


def test_errors_and_length(served, client):
    srv = served[0]
    import httpx

    bad = {"type": "json_schema", "json_schema": {"name": "b", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}}
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                           "response_format": bad}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and "nowhere" in err["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "string", "format": "nope"}}}},
        timeout=60)
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "response_format": {"type": "json_schema"}},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "response_format": {"type": "yaml"}},
                   timeout=60)
    assert r.status_code == 400
    long = {"type": "json_schema", "json_schema": {"name": "l", "schema": {
        "type": "array", "items": {"type": "string"}, "minItems": 40}}}
    c = chat(client, "x", response_format=long, max_tokens=6, temperature=0)
    assert c.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(c.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):  # the client does not take it for a complete object
        client.chat.completions.parse(model="m", messages=[{"role": "user", "content": "x"}],
                                      response_format=Person, max_tokens=3)


def test_benchmark_runs(served):
    """benchmarks/structured.py's parts on the tiny model (numbers meaningless; the script must run)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import structured as B

    gen = served[2]
    rows = B.serve_levels(gen, [1, 2], 1, 8)
    auto = served[1].state.lmforge.sched.masks_run()
    other = "batched" if auto == "thread" else "thread"
    modes = ["free", f"json_schema ({auto})", f"json_schema, masks {other}", "json_schema, masks per row",
             "free, same lengths"]
    assert [(r["clients"], r["mode"]) for r in rows] == [(c, m) for c in (1, 2) for m in modes]
    assert all(r["tokens"] > 0 and "ratio_to_free" in r and "ratio_to_same_lengths" in r
               for r in rows if r["mode"].startswith("json_schema"))
    assert served[1].state.lmforge.sched.mask_mode == "auto"  # the benchmark leaves the server as it found it
    c = B.compile_times(gen.tokenizer, gen.model.cfg.vocab_size)
    assert c["schema_cached_us"] < 1e3 * c["schema_cold_ms"]  # the cache is hit
    loop = B.loop_overlap(gen, 2, 6)
    assert [r["mode"] for r in loop][0] == "free" and all(r["steps"] > 0 for r in loop)
    libs = B.libraries({"tiny": (gen.tokenizer, gen.model.cfg.vocab_size)}, 10)
    assert libs[0]["library"].startswith("llguidance") and libs[0]["steps"] > 0


@pytest.mark.slow
def test_smollm2_parse_in_a_mixed_batch():
    """SmolLM2 on the int4 default path: pydantic-parsed replies while free rows decode in the same batch."""
    from test_constraints import SMOLLM2

    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not installed")
    gen = Generator.load(SMOLLM2)
    settings = ServeSettings(max_tokens=160, default_max_tokens=160, max_concurrent=8, model_name="m")
    srv = BackgroundServer(create_app(gen, settings=settings)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        with cf.ThreadPoolExecutor(4) as pool:
            parsed = [pool.submit(client.chat.completions.parse, model="m", response_format=Person,
                                  temperature=t, seed=1,
                                  messages=[{"role": "user", "content": f"Describe {who} as JSON."}])
                      for t, who in ((0.0, "a baker from Lyon"), (0.7, "a retired sailor"))]
            free = [pool.submit(chat, client, "Tell me a story.", temperature=0, max_tokens=40) for _ in range(2)]
            for f in parsed:
                assert isinstance(f.result().choices[0].message.parsed, Person)
            assert all(f.result().choices[0].message.content for f in free)
    finally:
        srv.stop()
