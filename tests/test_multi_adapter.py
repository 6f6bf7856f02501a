"""Several LoRA adapters over one served base (issue 38 item 3), on the tiny random llama of the serve tests.

References are independent of the multi-adapter layers: each adapter is loaded with lmforge.checkpoints.peft onto
its own fresh copy of the base (LoraLinear) and decoded alone by lmforge.decoding; a classifier adapter is loaded
by lmforge.tasks.classify.load_classifier (its own base copy).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from test_serve import _prompt, gate_forwards  # noqa: E402
from test_serve_batching import alone, request, wait  # noqa: E402

from lmforge.checkpoints import load_checkpoint  # noqa: E402
from lmforge.checkpoints.peft import load_adapters, save_adapters  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.generator import Generator  # noqa: E402
from lmforge.model.lora import LoraConfig, inject_lora  # noqa: E402
from lmforge.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from lmforge.serve.adapters import AdapterError, AdapterManager  # noqa: E402
from lmforge.serve.batching import Scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {"a0": (4, "q,v"), "a1": (8, "all-linear"), "a2": (2, "o,down")}  # name -> (rank, targets)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.4) -> None:
    """Nonzero A and B (a fresh LoRA has B = 0, which would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or n.startswith("score."):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def base_dir(tiny_dir) -> Path:
    """The served base: the serve tests' tiny random llama with its tokenizer (tests/conftest.py)."""
    return tiny_dir


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (rank, targets)) in enumerate(SPECS.items()):
        m = load_checkpoint(base_dir).model
        inject_lora(m, LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
        randomize(m, i)
        out[name] = save_adapters(m, root / name, base_model=str(base_dir))
    return out


@pytest.fixture(scope="module")
def classifier_dir(base_dir, tmp_path_factory) -> Path:
    """What `classify train --lora --save-adapters-only` leaves: adapters + score head, labels, classify.json."""
    from lmforge.model.heads import SequenceClassifier

    d = tmp_path_factory.mktemp("sentiment")
    ck = load_checkpoint(base_dir)
    m = SequenceClassifier(ck.model, 3, "last")
    inject_lora(m, LoraConfig(rank=4, alpha=8, targets=("q", "v", "up")))
    randomize(m, 7)
    save_adapters(m, d, base_model=str(base_dir))
    ck.tokenizer.save(d)
    (d / "labels.json").write_text(json.dumps(["negative", "neutral", "positive"]))
    (d / "classify.json").write_text(json.dumps({"kind": "transformer", "max_length": 64, "pooling": "last",
                                                  "base_model": str(base_dir), "lora": True, "adapters_only": True,
                                                  "padding_side": "right"}))
    return d


@pytest.fixture(scope="module")
def refs(base_dir, adapters) -> dict[str | None, Generator]:
    """name -> a Generator over its own base copy with the adapter as LoraLinear layers (None: the bare base)."""
    out = {None: Generator.load(base_dir)}
    for name, path in adapters.items():
        g = Generator.load(base_dir)
        load_adapters(g.model, path)
        out[name] = g
    return out


def fresh_gen(base_dir) -> Generator:
    return Generator.load(base_dir)


# ---- the layer: one batch, rows of different adapters ----------------------------------------------------------
@pytest.mark.parametrize("invariant", [True, False])
def test_mixed_rows_each_give_their_text_alone(base_dir, adapters, refs, invariant):
    """Rows of 3 adapters and of the base decode in one continuous batch (joining, leaving at different lengths,
    a second wave of the same prompts, which the prefix cache serves per adapter where it reuses prefixes): every
    row's tokens are those of its adapter's model decoding it alone."""
    gen = fresh_gen(base_dir)
    mgr = AdapterManager(gen.model, gen.tokenizer)
    for name, path in adapters.items():
        mgr.load(name, path)
    kw = {}
    if "batch_invariant" in inspect.signature(Scheduler).parameters:
        kw["batch_invariant"] = invariant
    elif invariant:
        pytest.skip("this scheduler has no batch-invariant mode")
    s = Scheduler(gen.model, gen.tokenizer, max_batch=16, max_queue=16, prefix_cache_bytes=1 << 20,
                  runtime=gen.runtime, lora=mgr.rows, **kw)
    try:
        names = [None, "a0", "a1", "a2"]
        prompts = [gen.tokenizer.encode(_prompt(i), True) for i in range(3)]
        jobs = [(ids, names[(i + j) % 4], 6 + 3 * ((i + j) % 4)) for i, ids in enumerate(prompts) for j in range(4)]
        solo = []  # each job alone through the same scheduler: its log-probabilities
        for ids, n, mt in jobs if invariant else []:
            r, c = request(ids, max_tokens=mt, adapter=None if n is None else mgr.get(n).ref)
            s.submit(r)
            wait(c)
            solo.append(c.logprobs)
        for wave in range(2):  # the second wave finds the first's prompts in the prefix cache, per adapter
            reqs = [request(ids, max_tokens=mt, adapter=None if n is None else mgr.get(n).ref) for ids, n, mt in jobs]
            s.submit_many([r for r, _ in reqs])
            wait(*(c for _, c in reqs))
            for (ids, n, mt), (_, c) in zip(jobs, reqs):
                text, _, toks = alone(refs[n], ids, mt)
                assert c.tokens == toks, (wave, n)
                assert c.text == text
            if invariant:  # batch invariance with adapters: each row's numbers are bit for bit its numbers alone
                assert [c.logprobs for _, c in reqs] == solo
        assert s.stats["max_rows"] == len(jobs)
        if not invariant:  # (the invariant engine reuses only prefixes on its chunk grid: none of these)
            assert s.stats["reused_tokens"] > 0
        # the adapters change the text (else this test could not fail)
        outs = {n: alone(refs[n], prompts[0], 12)[2] for n in names}
        assert len({tuple(t) for t in outs.values()}) == 4
    finally:
        s.close()


def test_quantized_base_and_fused_projections(base_dir, adapters):
    """Over an int8 / int4 base (int4: q|k|v and gate|up fused), each wrapped layer adds to the quantized base's
    output exactly each row's own adapter product (the adapter's tensors as LoraLinear reads them on a float copy),
    for rows that all share one adapter and for mixed rows. (The model level is checked on the float base above: a
    quantized base's own output depends on the batch's other rows.)"""
    from lmforge.model.lora import LoraLinear
    from lmforge.model.multi_lora import MultiLoraFused, MultiLoraLinear
    from lmforge.quant import QuantLinear, quantize_model

    torch.manual_seed(0)
    refs = {}
    for name, path in adapters.items():
        refs[name] = load_checkpoint(base_dir).model
        load_adapters(refs[name], path)

    def delta(name: str | None, layer: str, x: torch.Tensor) -> torch.Tensor:
        m = None if name is None else refs[name].get_submodule(layer)
        if not isinstance(m, LoraLinear):
            return torch.zeros(())
        return (x @ m.lora_A.T @ m.lora_B.T) * m.scale

    rows = [None, "a0", "a1", "a2"]
    for bits in (8, 4):
        model = quantize_model(load_checkpoint(base_dir).model, bits=bits)
        mgr = AdapterManager(model)
        for name, path in adapters.items():
            mgr.load(name, path)
        slots = [0 if n is None else mgr.get(n).ref.slot for n in rows]
        with torch.inference_mode():
            for layer in ("blocks.0.attn.q", "blocks.1.attn.v", "blocks.1.attn.o", "blocks.1.mlp.down"):
                mine = model.get_submodule(layer)
                assert isinstance(mine, MultiLoraLinear) and isinstance(mine.base, QuantLinear)
                x = torch.randn(4, 5, mine.in_features)
                base = mine.base(x)
                for b, name in enumerate(rows):  # every row the same adapter
                    mgr.rows.use([slots[b]] * 4)
                    torch.testing.assert_close(mine(x), base + delta(name, layer, x), atol=1e-5, rtol=1e-5)
                mgr.rows.use(slots)  # mixed rows
                got = mine(x)
                for b, name in enumerate(rows):
                    torch.testing.assert_close(got[b], base[b] + delta(name, layer, x[b]), atol=1e-5, rtol=1e-5)
            if bits == 4:
                attn, mlp = model.blocks[0].attn, model.blocks[1].mlp
                assert isinstance(attn.qkv, MultiLoraFused) and isinstance(mlp.gate_up, MultiLoraFused)
                x = torch.randn(4, 3, 64)
                for s in ([slots[2]] * 4, slots):  # the fused base call + each part's product
                    mgr.rows.use(s)
                    torch.testing.assert_close(attn.qkv(x), torch.cat([attn.q(x), attn.k(x), attn.v(x)], -1),
                                               atol=2e-4, rtol=1e-4)
                    torch.testing.assert_close(mlp.gate_up(x), torch.cat([mlp.gate(x), mlp.up(x)], -1),
                                               atol=2e-4, rtol=1e-4)
            mgr.rows.use(None)


def test_prefix_cache_keeps_adapters_apart():
    from lmforge.serve.prefix_cache import PrefixCache

    pc = PrefixCache(1 << 20, min_tokens=2)
    toks = list(range(10))
    pc.store(toks, [torch.zeros(2, 10, 4)], [torch.zeros(2, 10, 4)], ns=None)
    pc.store(toks, [torch.ones(2, 10, 4)], [torch.ones(2, 10, 4)], ns=7)
    assert len(pc) == 2
    assert float(pc.lookup(toks + [1])[1][0].sum()) == 0  # the base's
    assert float(pc.lookup(toks + [1], 7)[1][0].mean()) == 1  # adapter 7's
    assert pc.lookup(toks + [1], 8) is None  # another adapter (or a reload of 7 under a new key): nothing


# ---- the server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(base_dir, adapters, classifier_dir):
    gen = fresh_gen(base_dir)
    app = create_app(gen, settings=ServeSettings(api_key="k", max_concurrent=8, max_queue=32, max_adapters=6))
    srv = BackgroundServer(app).start()
    srv.gen, srv.st = gen, app.state.lmforge
    srv.headers = {"Authorization": "Bearer k"}
    yield srv
    srv.stop()


def post(srv, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=srv.headers, timeout=timeout)


def complete(srv, model: str, ids_text: str, max_tokens: int) -> httpx.Response:
    body = {"model": model, "prompt": ids_text, "max_tokens": max_tokens, "temperature": 0}
    return post(srv, "/v1/completions", body)


def test_adapters_load_list_and_answer_by_model_name(server, adapters, refs, classifier_dir):
    for name, path in adapters.items():
        r = post(server, "/v1/adapters", {"name": name, "path": str(path)})
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "generate"
    r = post(server, "/v1/adapters", {"name": "sentiment", "path": str(classifier_dir)})
    assert r.status_code == 200 and r.json()["kind"] == "classify", r.text
    models = httpx.get(server.url + "/v1/models", headers=server.headers).json()["data"]
    base = models[0]["id"]
    listed = {m["id"]: m for m in models}
    assert set(adapters) | {"sentiment"} <= set(listed)
    assert listed["a1"]["parent"] == base and listed["sentiment"]["labels"] == ["negative", "neutral", "positive"]
    tok = server.gen.tokenizer
    for i, name in enumerate([*adapters, None]):
        text = _prompt(i)
        model = base if name is None else (name if i % 2 else f"{base}:{name}")
        r = complete(server, model, text, 10)
        assert r.status_code == 200, r.text
        want = alone(refs[name], tok.encode(text, True), 10)[0]
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["model"] == (name or base)


def test_classifier_adapter_answers_classify_from_the_same_base(server, classifier_dir):
    from lmforge.tasks.classify import load_classifier, predict

    texts = [_prompt(i) for i in range(5)]
    ref = predict(load_classifier(classifier_dir), texts)  # its own base copy, LoraLinear layers
    r = post(server, "/v1/classify", {"model": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    got = r.json()["data"]
    assert [g["label"] for g in got] == [p["label"] for p in ref]
    for g, p in zip(got, ref):
        for lab, v in p["probabilities"].items():
            assert abs(g["probabilities"][lab] - v) < 1e-4
    assert len({g["label"] for g in got}) > 1 or len(set(json.dumps(g["probabilities"]) for g in got)) > 1
    r = post(server, "/v1/classify", {"model": "a0", "input": "x"})  # a generation adapter
    assert r.status_code == 400 and "a0" in r.json()["error"]["message"]


def test_unload_under_load_loses_no_request(server, adapters, refs):
    """Rows admitted before an unload finish with their adapter; new ones get 404; then its slot is free, and
    loading it again (a new prefix-cache key) gives the same text."""
    for name in ("a0", "a1"):  # (loaded by the test above when it ran: then a 409)
        assert post(server, "/v1/adapters", {"name": name, "path": str(adapters[name])}).status_code in (200, 409)
    tok = server.gen.tokenizer
    gate, handle = gate_forwards(server.gen.model)
    results: dict[int, httpx.Response] = {}
    jobs = [(i, "a0" if i % 2 else "a1", _prompt(10 + i)) for i in range(8)]

    def run(i: int, model: str, text: str) -> None:
        results[i] = complete(server, model, text, 12)

    threads = [threading.Thread(target=run, args=j) for j in jobs]
    try:
        for t in threads:
            t.start()
        st = server.st
        for _ in range(500):  # every request submitted (its adapter counted) before the unload
            if st.sched.running + st.sched.waiting >= len(jobs):
                break
            threading.Event().wait(0.02)
        r = httpx.delete(server.url + "/v1/adapters/a0", headers=server.headers, timeout=30)
        assert r.status_code == 200 and r.json()["state"] == "draining" and r.json()["running"] == 4, r.text
        r = complete(server, "a0", "the cat", 4)
        assert r.status_code == 404 and "a0" in r.json()["error"]["message"]
        r = post(server, "/v1/adapters", {"name": "a0", "path": str(adapters["a0"])})
        assert r.status_code == 409, r.text
        r = post(server, "/v1/adapters", {"name": "a2b", "path": str(adapters["a2"])})  # a load under load
        assert r.status_code == 200, r.text
    finally:
        gate.set()
        handle.remove()
        for t in threads:
            t.join(120)
    for i, name, text in jobs:
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["choices"][0]["text"] == alone(refs[name], tok.encode(text, True), 12)[0]
    listed = {a["id"] for a in httpx.get(server.url + "/v1/adapters", headers=server.headers).json()["data"]}
    assert "a0" not in listed and "a2b" in listed
    r = post(server, "/v1/adapters", {"name": "a0", "path": str(adapters["a0"])})
    assert r.status_code == 200, r.text
    text = _prompt(3)
    assert complete(server, "a0", text, 10).json()["choices"][0]["text"] == alone(refs["a0"], tok.encode(text, True),
                                                                                  10)[0]
    assert complete(server, "a2b", text, 10).json()["choices"][0]["text"] == alone(refs["a2"],
                                                                                   tok.encode(text, True), 10)[0]


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_bad_adapters_are_refused_with_one_line(server, adapters, tmp_path):
    # another base's shapes (a llama of another width)
    other = tmp_path / "other"
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    m = load_checkpoint(other).model
    inject_lora(m, LoraConfig(rank=4, targets="q,v"))
    save_adapters(m, tmp_path / "other-ad")
    # a config that gives another rank than the tensors
    wrong_rank = tmp_path / "wrong-rank"
    shutil.copytree(adapters["a0"], wrong_rank)
    c = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**c, "r": 3}))
    # a missing weights file
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(adapters["a0"] / "adapter_config.json", missing)
    cases = {"other-ad": (tmp_path / "other-ad", "blocks.0.attn.q"), "wrong-rank": (wrong_rank, "rank-3"),
             "missing": (missing, "adapter_model.safetensors"), "nowhere": (tmp_path / "nowhere", "no such"),
             "merged": (other, "merged model")}
    for name, (path, why) in cases.items():
        r = post(server, "/v1/adapters", {"name": name, "path": str(path)})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and name in msg and why in msg and "\n" not in msg, (name, msg)
    r = post(server, "/v1/adapters", {"name": server.st.model_id, "path": str(adapters["a0"])})  # the base's name
    assert r.status_code == 409 and server.st.model_id in r.json()["error"]["message"]
    r = post(server, "/v1/adapters", {"name": "bad:name", "path": str(adapters["a0"])})
    assert r.status_code == 400 and "bad:name" in r.json()["error"]["message"]
    # unknown names in `model` and in DELETE
    r = complete(server, "nosuch", "the cat", 4)
    assert r.status_code == 404 and "nosuch" in r.json()["error"]["message"]
    r = httpx.delete(server.url + "/v1/adapters/nosuch", headers=server.headers, timeout=30)
    assert r.status_code == 404 and "nosuch" in r.json()["error"]["message"]
    # behind the API key
    r = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": str(adapters["a0"])}, timeout=30)
    assert r.status_code == 401


def test_cli_adapter_flags(base_dir, adapters, tmp_path):
    from lmforge.cli.serve import build_app, register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="verb"))
    a = p.parse_args(["serve", "--model", str(base_dir), "--adapter", f"x={adapters['a0']}",
                      "--adapter", f"y={adapters['a2']}", "--max-adapters", "3"])
    st = build_app(a).state.lmforge
    assert {m["id"] for m in st.models()} >= {"x", "y"} and st.settings.max_adapters == 3
    assert st.adapter_for(f"{st.model_id}:y") == "y" and st.adapter_for("y") == "y" and st.adapter_for("z") is None
    for bad, why in ((["--adapter", "x"], "NAME=RUN_DIR"), (["--adapter", f"x={tmp_path}"], "adapter_config.json")):
        with pytest.raises(LmforgeError, match=why) as e:
            build_app(p.parse_args(["serve", "--model", str(base_dir), *bad]))
        assert "\n" not in str(e.value)


def test_manager_limits(base_dir, adapters):
    gen = fresh_gen(base_dir)
    mgr = AdapterManager(gen.model, max_adapters=2)
    mgr.load("a", adapters["a0"])
    mgr.load("b", adapters["a1"])
    with pytest.raises(AdapterError, match="limit is 2") as e:
        mgr.load("c", adapters["a2"])
    assert e.value.status == 409
    held = mgr.acquire("a")
    mgr.unload("a")
    assert mgr.get("a") is None and mgr.all()[0].draining
    with pytest.raises(AdapterError, match="being unloaded"):
        mgr.acquire("a")
    mgr.release(held)
    assert [a.name for a in mgr.all()] == ["b"]
    mgr.load("c", adapters["a2"])  # slot 1 again, without a's tensors
    assert mgr.get("c").ref.slot == 1 and mgr.get("c").ref.key == 3


def test_rows_are_per_thread(base_dir, adapters):
    """A thread that set nothing runs the base, while another thread's rows run an adapter."""
    gen = fresh_gen(base_dir)
    mgr = AdapterManager(gen.model)
    mgr.load("a", adapters["a1"])
    x = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        base = load_checkpoint(base_dir).model(x)
        mgr.rows.use([1])
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("other", gen.model(x)))
        t.start()
        t.join()
        mine = gen.model(x)
        mgr.rows.use(None)
    torch.testing.assert_close(out["other"], base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mine, base)


def test_benchmark_adapters_are_nonzero_and_load(base_dir, tmp_path):
    """benchmarks/serve_adapters.py's random adapters: the base's shapes, nonzero products, served like any."""
    from benchmarks.serve_adapters import make_adapters

    dirs = make_adapters(str(base_dir), 2, 4, "q,v", tmp_path)
    gen = fresh_gen(base_dir)
    mgr = AdapterManager(gen.model)
    for i, d in enumerate(dirs):
        mgr.load(f"b{i}", d)
    x = torch.randint(3, 200, (1, 6))
    with torch.inference_mode():
        base = gen.model(x)
        mgr.rows.use([mgr.get("b1").ref.slot])
        out = gen.model(x)
        mgr.rows.use(None)
    assert not torch.equal(out, base) and torch.allclose(out, base, atol=0.5)
