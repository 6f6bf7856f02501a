"""Training speed: lmforge vs transformers on the same rows, batches and settings, two workloads side by side.

    python benchmarks/train_speed.py [--workloads finetune,qa,finetune-q4] [--impls lmforge,transformers] [--steps N]
                                     [--minutes 12] [--warmup 2] [--threads 2] [--precision auto|fp32|bf16]
                                     [--val-rows 48] [--quick] [--out benchmarks/results/train_speed.json]

Workloads. Their settings are what the CLI builds from its own parser, defaults and task recipe for the command
shown (model, lengths, LoRA, batch size, lr, warmup, schedule, weight decay, clipping, seed); the --ft-*, --lora-*
and --qa-* flags override single ones. The run prints them, and the JSON records every one.
  finetune  `lmforge finetune --task summarize --lora` (SmolLM2-135M-Instruct: the built-in GGUF, dequantized to
            float32 on both sides) on WikiLingua rows (../shared/data/summarization/wikilingua_en_1k.jsonl, document
            -> summary, chat-template prompt; the file's tail that finetune keeps for validation is left out).
  finetune-q4  (not in the default list) the finetune workload's LoRA with the frozen base held in the Q4_1 file's
            int4 blocks (`--quantize auto`), against the same run on the float base, transformers + peft and
            transformers + peft + bitsandbytes nf4: peak RSS against the memory budget, step time, and the
            validation loss after the same steps (benchmarks/train_q4.py says how each is measured).
  qa        `lmforge qa train` (minilm-l6) on ../shared/data/qa/nyt_v1.0.json (the training side of its split by
            article), windows with the CLI's length and stride. The QA head is new on both sides and gets the same
            seeded init.

Implementations, each in its own fresh subprocess:
  lmforge       the task module's own pieces (tasks/seq2seq.py or tasks/qa.py: data, examples or windows, model,
                LoRA, collate, loss) and the Trainer, with the CLI's train settings: what `lmforge finetune` /
                `lmforge qa train` run, minus their evaluation and export. Step times come from a thin wrapper
                around the task's loss function that notes when each optimizer step starts.
  transformers  AutoModelForCausalLM (from the same GGUF) + peft LoraConfig with the same rank, alpha, dropout and
                modules, or AutoModelForQuestionAnswering (same minilm weights; dropout as lmforge's model: 0), in a
                plain PyTorch loop: the same tokenized rows (prompt masked with -100), the same batches in the same
                order (lmforge's length-bucketed sampler, same seed), torch's AdamW with the same groups, lr, betas
                and weight decay, the same lr curve (a LambdaLR over the Trainer's formula) and clipping,
                torch.autocast(bfloat16) around the forward when the precision is bf16.

Precision: --precision auto takes what `lmforge.train.precision.resolve_precision` picks for this CPU (bf16 autocast
only where the CPU has avx512_bf16 or AMX); both sides then compute in it. The table says which one and why.

Measured: `--warmup` untimed optimizer steps, then `--steps` timed ones (the same batches on both sides; by default
sized from the measured matmul peak so that the whole run takes about `--minutes`, 8 to 64 steps). A step
is everything from one step's start to the next one's: batch collation, forward, backward, clipping, AdamW and
the schedule. Quoted: samples/s and real (unpadded) tokens/s over the timed steps, the median step time, the
median of the per-step time ratios (paired: each step is the same batch on both sides), peak RSS of the worker
(loading included) and during training alone, and the first and last training loss of both sides (close, not
identical: adapter inits and kernels differ). The matmul peaks (2048^3, fp32 and bf16, same threads) are
measured in their own worker first. Target of the issue: lmforge >= 2x transformers on each workload.

The parts: train_workloads.py (the settings, rows, batches, both training loops and the workers that run them),
train_q4.py (the finetune-q4 workload); this file plans the run, starts the workers and reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    machine_info,
    matmul_peak,
    report,
    run_worker,
    set_threads,
    write_json,
)

# HF_LORA_NAMES, batch_order, finetune_examples, hf_causal_collate, plain_loop, run_trainer, train_config: what
# benchmarks/train_q4.py imports from here
from benchmarks.train_workloads import (  # noqa: E402, F401
    DATA_FILES,
    HF_LORA_NAMES,
    WORKERS,
    batch_order,
    describe,
    finetune_examples,
    hf_causal_collate,
    plain_loop,
    run_trainer,
    settings,
    train_config,
)

WORKLOADS = ("finetune", "qa", "finetune-q4")
DEFAULT_WORKLOADS = ("finetune", "qa")
IMPLS = ("lmforge", "transformers", "lmforge-q4", "bitsandbytes")
IMPLS_OF = {"finetune": ("lmforge", "transformers"), "qa": ("lmforge", "transformers"),
            "finetune-q4": ("lmforge-q4", "lmforge", "transformers", "bitsandbytes")}
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
SEED = 42
# rough training FLOPs per token, for the ETA only: LoRA's backward skips weight gradients (~4N), full QA ~6N
EST_FLOPS_PER_TOKEN = {"finetune": 4 * 135e6, "qa": 6 * 11e6, "finetune-q4": 4 * 135e6}
# guessed shares of the matmul peak a training step reaches (ETA and --steps auto only; the ETA is refined with the
# pace of the workers that finished)
EST_EFFICIENCY = {"lmforge": 0.25, "transformers": 0.12, "lmforge-q4": 0.2, "bitsandbytes": 0.05}
EST_LOAD_S = 40.0  # per worker: loading, tokenizing, the final checkpoint
AUTO_STEPS = (8, 64)  # the range --steps auto picks from


# ---- workers -----------------------------------------------------------------------------------------------
def worker_peak(seconds: float) -> dict[str, Any]:
    import torch

    return {"impl": "peak", **{f"peak_{n}": matmul_peak(dt, seconds)
                               for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}


def worker(a: argparse.Namespace) -> None:
    import torch

    set_threads(a.threads)
    if a.impl == "peak":
        report(worker_peak(a.peak_seconds))
        return
    s = json.loads(a.settings)
    t0 = time.perf_counter()
    if a.workload == "finetune-q4":
        from benchmarks.train_q4 import WORKERS as Q4_WORKERS

        res = Q4_WORKERS[(a.impl, a.workload)](s)
    else:
        res = WORKERS[(a.impl, a.workload)](s)
    report({"impl": a.impl, "workload": a.workload, "precision": s["precision"], **res,
            "wall_s": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads()})


# ---- parent ------------------------------------------------------------------------------------------------
def step_estimate_s(s: dict[str, Any], workload: str, impl: str, peak: float) -> float:
    """A rough optimizer-step time: the step's FLOPs (full-length rows) at a guessed share of the matmul peak."""
    flops = EST_FLOPS_PER_TOKEN[workload] * s["batch_size"] * s["max_length"]
    return flops / max(peak * EST_EFFICIENCY[impl], 1e9)


def auto_steps(cfg: dict[str, dict[str, Any]], plan: Sequence[tuple[str, str]], peak: float, warmup: int,
               minutes: float) -> int:
    """Timed steps per worker so that the whole run takes about `minutes` by the estimate (within AUTO_STEPS)."""
    per_step = sum(step_estimate_s(cfg[w], w, i, peak) for w, i in plan)  # one step of every worker
    room = minutes * 60 - EST_LOAD_S * len(plan) - warmup * per_step
    return int(min(max(room / max(per_step, 1e-9), AUTO_STEPS[0]), AUTO_STEPS[1]))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """On each lmforge row: samples/s over transformers' and the median of the paired per-step time ratios."""
    for r in rows:
        ref = next((x for x in rows if x["workload"] == r["workload"] and x["impl"] == "transformers"), None)
        if r["impl"] not in ("lmforge", "lmforge-q4") or ref is None or "samples_per_s" not in r \
                or "samples_per_s" not in ref:
            continue
        r["vs_transformers"] = r["samples_per_s"] / ref["samples_per_s"]
        w = r["warmup_steps"]
        pairs = list(zip(ref["times"][w:], r["times"][w:]))
        if pairs:
            r["paired_step_ratio"] = statistics.median(h / max(m, 1e-9) for h, m in pairs)
        if r["workload"] in DEFAULT_WORKLOADS:  # the training-speed issue's target (finetune-q4 has its own)
            r["target_met"] = r["vs_transformers"] >= 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma list of {', '.join(WORKLOADS)} (default: {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: each workload's: "
                   + "; ".join(f"{w}: {','.join(i)}" for w, i in IMPLS_OF.items()) + ")")
    p.add_argument("--val-rows", type=int, default=48, help="finetune-q4: validation rows the final loss is taken on")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per worker (default: sized from "
                   "the measured matmul peak so that the run takes about --minutes)")
    p.add_argument("--minutes", type=float, default=12.0, help="the run time the default --steps aims at")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: what lmforge's resolve_precision picks for this CPU; both sides use it")
    p.add_argument("--quick", action="store_true",
                   help="an end-to-end check: 2 timed steps after 1, 200 rows per workload, short peak runs")
    p.add_argument("--max-rows", type=int, default=0, help="first N training rows/questions (0 = all)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the shared data folder")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="per dtype, for the matmul peaks")
    p.add_argument("--ft-batch-size", type=int, default=None)
    p.add_argument("--ft-max-length", type=int, default=None)
    p.add_argument("--ft-max-target-length", type=int, default=None)
    p.add_argument("--ft-lr", type=float, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--lora-targets", default=None, help="q,k,v,o,gate,up,down or all-linear")
    p.add_argument("--qa-batch-size", type=int, default=None)
    p.add_argument("--qa-max-length", type=int, default=None)
    p.add_argument("--qa-doc-stride", type=int, default=None)
    p.add_argument("--qa-lr", type=float, default=None)
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/train_speed.json; "
                   "with --quick a file in the temp folder, so a check never replaces real results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.quick:
        a.steps, a.warmup, a.peak_seconds, a.max_rows = 2, 1, 0.3, a.max_rows or 200
        a.val_rows = min(a.val_rows, 8)
    out = a.out or str(Path(tempfile.gettempdir()) / "train_speed_quick.json" if a.quick
                       else RESULTS_DIR / "train_speed.json")
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    impls = [i.strip() for i in a.impls.split(",") if i.strip()] if a.impls else list(IMPLS)
    bad = [w for w in workloads if w not in WORKLOADS] + [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown workload or implementation {bad} (workloads: {', '.join(WORKLOADS)}; "
                f"impls: {', '.join(IMPLS)})")
    if (a.steps is not None and a.steps < 1) or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    missing = [str(a.data_dir / DATA_FILES[w]) for w in workloads if not (a.data_dir / DATA_FILES[w]).is_file()]
    if missing:
        print(f"train_speed: missing data {', '.join(missing)} (the benchmark reads ../shared/data next to the "
              "repository; pass --data-dir)", file=sys.stderr)
        return 2

    import torch

    from lmforge.train.precision import cpu_has_native_bf16, resolve_precision

    prec = resolve_precision(a.precision, torch.device("cpu"))
    me = str(Path(__file__).resolve())
    t_start = time.perf_counter()
    print(f"{prec.describe()}; measuring the matmul peaks ...", file=sys.stderr, flush=True)
    peak = run_worker([me, "--worker", "--impl", "peak", "--threads", str(a.threads), "--peak-seconds",
                       str(a.peak_seconds)], a.threads, timeout=600)
    peak_now = peak.get(f"peak_{prec.name}", 0.0)
    plan = [(w, i) for w in workloads for i in impls if i in IMPLS_OF[w]]
    if not plan:
        p.error(f"no implementation of {', '.join(workloads)} among {', '.join(impls)}")
    steps_auto = a.steps is None
    if steps_auto:
        a.steps = 1  # a placeholder: the step count does not enter the per-step estimate
        a.steps = auto_steps(settings(a, prec.name), plan, peak_now, a.warmup, a.minutes)
        print(f"--steps {a.steps} (sized for about {a.minutes:g} min from the {prec.name} matmul peak "
              f"{peak_now / 1e9:.0f} GFLOP/s)", file=sys.stderr, flush=True)
    cfg = settings(a, prec.name)
    est = {(w, i): EST_LOAD_S + (a.warmup + a.steps) * step_estimate_s(cfg[w], w, i, peak_now) for w, i in plan}
    scale, done_est, done_real = 1.0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    for k, (w, impl) in enumerate(plan):
        left = scale * sum(est[x] for x in plan[k:])
        print(f"running {impl} on {w} ({k + 1}/{len(plan)}); about {left / 60:.1f} min left", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        r = run_worker([me, "--worker", "--impl", impl, "--workload", w, "--threads", str(a.threads),
                        "--settings", json.dumps(cfg[w])], a.threads, timeout=3600)
        done_est, done_real = done_est + est[(w, impl)], done_real + time.perf_counter() - t0
        scale = done_real / done_est  # the machine's pace so far
        r = {"workload": w, "impl": impl, "precision": prec.name, "warmup_steps": a.warmup, **r}
        if "error" in r:
            print(f"  {impl} on {w} failed: {r['error']}", file=sys.stderr, flush=True)
        rows.append(r)
    add_ratios(rows)

    info = machine_info()
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info.get("simd", [])] or ["none"]
    gf = {n: peak[f"peak_{n}"] / 1e9 for n in ("fp32", "bf16") if f"peak_{n}" in peak}
    print(f"\n{describe(cfg)}")
    print(f"precision {prec.name} ({prec.reason}); CPU bf16 flags: {', '.join(flags)} "
          f"(native: {cpu_has_native_bf16() or 'no'}); matmul peak "
          + ", ".join(f"{n} {v:.0f} GFLOP/s" for n, v in gf.items())
          + f"; {a.threads} threads; {a.warmup} warm-up + {a.steps} timed steps\n")
    cols = [("workload", "workload"), ("impl", "impl"), ("precision", "precision"), ("steps", "timed steps"),
            ("step_s", "median step s"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"),
            ("vs_transformers", "vs transformers"), ("paired_step_ratio", "paired step ratio"),
            ("peak_mb", "peak MB"), ("train_peak_mb", "train peak MB"), ("first_loss", "first loss"),
            ("final_loss", "final loss"), ("val_loss", "val loss"), ("used_mb", "MB over start"),
            ("budget_mb", "budget MB"), ("error", "error")]
    print(format_table(rows, cols))
    if "finetune-q4" in workloads:
        from benchmarks.train_q4 import summarize_q4

        for line in summarize_q4(rows):
            print(line)
    for r in rows:
        if "target_met" in r:
            print(f"{r['workload']}: lmforge {r['vs_transformers']:.2f}x transformers "
                  f"(target >= 2x: {'met' if r['target_met'] else 'not met'})")
    payload = {"benchmark": "train_speed", "target": "lmforge >= 2x transformers samples/s on each workload",
               "precision": prec.name, "precision_reason": prec.reason, "cpu_bf16_flags": flags,
               "peak_flops": {n: peak.get(f"peak_{n}") for n in ("fp32", "bf16")}, "peak_error": peak.get("error"),
               "threads": a.threads, "steps": a.steps, "steps_auto": steps_auto, "warmup": a.warmup,
               "settings": cfg, "results": rows,
               "machine": info, "wall_s": round(time.perf_counter() - t_start, 1),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\nwrote {write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
