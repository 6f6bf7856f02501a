"""Exported GGUF files: size, and greedy decode speed in llama.cpp next to lmforge's default path on the same file.

    python benchmarks/export.py [--new-tokens 128] [--threads 2] [--reps 3] [--out benchmarks/results/export.json]

SmolLM2-135M-Instruct (the built-in model) is exported with `lmforge.export` to f16 and q8_0; the shipped Q4_1
file is measured beside them. Batch 1, a 30-token prompt, `new_tokens` greedy tokens, no stop token; median
of `reps` runs after one warm-up. llama.cpp runs through llama-cpp-python; lmforge through `Generator.load`
(its default path: q8_0 -> int8 layers, Q4_1 -> int4 layers, f16 -> float32). Each file and implementation
runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, format_table, machine_info, report, run_worker, set_threads, write_json

MODEL = "smollm2-135m-instruct"
TEXT = Path(__file__).resolve().parent.parent / "examples" / "article.txt"


def _prompt(tok) -> list[int]:
    return tok.encode(TEXT.read_text(), add_special_tokens=False)[:30]


def worker(impl: str, path: str, new: int, threads: int, reps: int) -> dict:
    set_threads(threads)
    from lmforge.tokenizer import Tokenizer

    prompt = _prompt(Tokenizer.from_gguf(Path(path)))
    if impl == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                              verbose=False)

        def run() -> float:
            llm.reset()
            t0, n = time.perf_counter(), 0
            for _t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                n += 1
                if n == new:
                    break
            return time.perf_counter() - t0
    else:
        import torch

        from lmforge.decoding import GenerationConfig, stream_tokens
        from lmforge.generator import Generator

        g = Generator.load(path)
        ids, gc = torch.tensor([prompt]), GenerationConfig(max_new_tokens=new, stop_token_ids=[])

        def run() -> float:
            t0 = time.perf_counter()
            for _ in stream_tokens(g.model, ids, None, gc):
                pass
            return time.perf_counter() - t0
    run()  # warm-up
    return {"impl": impl, "tok_s": round(new / statistics.median(run() for _ in range(reps)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS_DIR / "export.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        report(worker(a.worker, a.path, a.new_tokens, a.threads, a.reps))
        return
    import lmforge
    from lmforge.checkpoints.registry import resolve

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-export-bench-"))
    model, tok = lmforge.load(MODEL)
    files = {t: lmforge.export(model, tmp / f"smollm2.{t}.gguf", format="gguf", type=t, tokenizer=tok)
             for t in ("f16", "q8_0")}
    files["Q4_1 (shipped)"] = resolve(MODEL)[0]
    del model
    rows = []
    for name, path in files.items():
        row = {"file": name, "size_mb": round(path.stat().st_size / 1e6, 1)}
        for impl in ("llama.cpp", "lmforge"):
            print(f"running {impl} on {name} ...", file=sys.stderr, flush=True)
            r = run_worker([__file__, "--worker", impl, "--path", str(path), "--new-tokens", str(a.new_tokens),
                            "--threads", str(a.threads), "--reps", str(a.reps)], a.threads, timeout=1800)
            row[impl] = r.get("tok_s", r.get("error"))
        row["ratio"] = round(row["lmforge"] / row["llama.cpp"], 2) if all(
            isinstance(row[k], float) for k in ("lmforge", "llama.cpp")) else None
        rows.append(row)
    print(format_table(rows, [("file", "file"), ("size_mb", "size MB"), ("llama.cpp", "llama.cpp tok/s"),
                              ("lmforge", "lmforge tok/s"), ("ratio", "lmforge / llama.cpp")]))
    write_json(a.out, {"machine": machine_info(), "model": MODEL, "new_tokens": a.new_tokens, "threads": a.threads,
                       "rows": rows})
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
