"""Where one training step of each trainer verb spends its time: forward, backward, optimizer, between steps.

    python benchmarks/step_profile.py [--verbs classify,qa,summarize,summarize-lora,translate,pretrain] [--warmup 3]
                                      [--steps 4] [--threads 2] [--out benchmarks/results/step_profile.json]

Each verb runs its real CLI command (below) in a fresh subprocess, with its defaults and recipe. After `--warmup`
untimed optimizer steps (first steps create kernels and fill allocator caches), `--steps` steps are timed with
no profiler, then `--steps` more run under torch.profiler (CPU activities, no shapes or stacks); the run is then
stopped. The Trainer marks its regions with record_function (train.forward: the loss function under autocast;
train.backward; train.optimizer: gradient scaling, clipping, AdamW, schedule, zero_grad). Reported per verb:
  step ms        median wall time of a timed (unprofiled) optimizer step
  tokens/step    mean real (unpadded) tokens in a timed step's batches; tokens/s: their sum over the timed steps'
                 wall time, the figure to compare with a whole run's tokens_per_s (metrics.jsonl)
  forward/backward/optimizer %   each region's share of the profiled steps' wall time
  other %        the rest of the profiled step (batch to device, loss bookkeeping, Python)
  between ms     median wall time from one step's end to the next one's start: fetching and collating the batch,
                 logging, the progress bar (the loop's own per-step work outside the step)
  top ops        the operators with the most self CPU time in the profiled steps, ms per step
Commands (DATA = ../shared/data; a verb whose data is missing is skipped with its reason):
  classify   lmforge classify train                        (minilm-l6 on the built-in tweets, its defaults)
  qa         lmforge qa train --data DATA/qa/nyt_v1.0.json (the QA recipe: minilm-l6, 384/128 windows)
  summarize  lmforge finetune --task summarize --data DATA/summarization/wikilingua_en_1k.jsonl --input-field
             document --target-field summary (recipe: SmolLM2 full fine-tune, batch 8, max length 640)
  summarize-lora  the same with --lora (LoRA r8 on q,v: train_speed.py's finetune workload)
  translate  lmforge finetune --task translate --data DATA/translation/bible_ot_en_es.jsonl --input-field en
             --target-field es --from en --to es (recipe: Gemma-3-270M LoRA r32, batch 16, max length 256)
  pretrain   lmforge pretrain --data DATA/text/persuasion.txt  (gpt2-tiny, its defaults; tokenizer training is
             before the first step and not in the profile)
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

from benchmarks.common import (
    RESULTS_DIR,
    format_table,
    machine_info,
    measured_peaks,
    report,
    run_worker,
    set_threads,
    write_json,
)

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
REGIONS = ("train.forward", "train.backward", "train.optimizer")
VERBS: dict[str, tuple[list[str], Path | None]] = {
    "classify": (["classify", "train"], None),
    "qa": (["qa", "train", "--data", str(DATA / "qa" / "nyt_v1.0.json")], DATA / "qa" / "nyt_v1.0.json"),
    "summarize": (["finetune", "--task", "summarize", "--data", str(DATA / "summarization" / "wikilingua_en_1k.jsonl"),
                   "--input-field", "document", "--target-field", "summary"],
                  DATA / "summarization" / "wikilingua_en_1k.jsonl"),
    "summarize-lora": (["finetune", "--task", "summarize", "--lora", "--data",
                        str(DATA / "summarization" / "wikilingua_en_1k.jsonl"),
                        "--input-field", "document", "--target-field", "summary"],
                       DATA / "summarization" / "wikilingua_en_1k.jsonl"),
    "translate": (["finetune", "--task", "translate", "--data", str(DATA / "translation" / "bible_ot_en_es.jsonl"),
                   "--input-field", "en", "--target-field", "es", "--from", "en", "--to", "es"],
                  DATA / "translation" / "bible_ot_en_es.jsonl"),
    "pretrain": (["pretrain", "--data", str(DATA / "text" / "persuasion.txt")], DATA / "text" / "persuasion.txt"),
}


class _Done(BaseException):
    """Raised from the last profiled step to stop the run there (no final eval or export to wait for)."""


def worker(verb: str, warmup: int, steps: int, threads: int) -> dict:
    import torch

    set_threads(threads)
    from lmforge.cli import main as cli_main
    from lmforge.train import trainer as T

    argv, data = VERBS[verb]
    if data is not None and not data.is_file():
        return {"verb": verb, "skipped": f"no {data}"}
    orig = T.Trainer._train_step
    rec: dict = {"walls": [], "gaps": [], "tokens": [], "padded": [], "n": 0, "end": None, "prof": None, "info": {}}

    def step(self, window, state) -> None:
        n = rec["n"]
        if n == warmup + steps:  # the profiled part starts
            rec["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            rec["prof"].__enter__()
            rec["t_prof"] = time.perf_counter()
        t0 = time.perf_counter()
        if rec["end"] is not None and n > warmup:
            rec["gaps"].append(t0 - rec["end"])
        orig(self, window, state)
        rec["end"] = time.perf_counter()
        if warmup <= n < warmup + steps:
            rec["walls"].append(rec["end"] - t0)
            rec["tokens"].append(sum(T.batch_counts(b)[1] for b in window))
            rec["padded"].append(sum(b["input_ids"].numel() for b in window
                                     if isinstance(b, dict) and "input_ids" in b))
        if n == 0:
            s, t = T.batch_counts(window[0])
            rec["info"] = {"precision": self.precision.name, "batch_size": self.config.batch_size,
                           "grad_accum": self.config.grad_accum, "first_batch_samples": s, "first_batch_tokens": t,
                           "trainable_params": sum(p.numel() for p in self._params)}
        rec["n"] = n + 1
        if rec["n"] == warmup + 2 * steps:
            rec["prof_wall"] = time.perf_counter() - rec["t_prof"]
            rec["prof"].__exit__(None, None, None)
            raise _Done

    T.Trainer._train_step = step
    with tempfile.TemporaryDirectory(prefix="lmforge-step-profile-") as tmp:
        try:
            rc = cli_main([*argv, "--output", str(Path(tmp) / "run"), "--max-steps", str(warmup + 2 * steps + 1),
                           "--no-progress"])
            return {"verb": verb, "error": f"the run ended (exit {rc}) before {warmup + 2 * steps} steps"}
        except _Done:
            pass
    ev = {e.key: e for e in rec["prof"].key_averages()}
    wall_ms = rec["prof_wall"] * 1e3 / steps
    shares = {r.split(".")[1]: round(100 * ev[r].cpu_time_total / 1e3 / steps / wall_ms, 1) if r in ev else None
              for r in REGIONS}
    skip = set(REGIONS) | {"ProfilerStep*"}
    ops = sorted((e for k, e in ev.items() if k not in skip and not k.startswith(("train.", "autograd::engine"))),
                 key=lambda e: -e.self_cpu_time_total)[:8]
    return {"verb": verb, "command": "lmforge " + " ".join(argv), **rec["info"],
            "step_ms": round(statistics.median(rec["walls"]) * 1e3, 1),
            "timed_tokens_per_step": round(statistics.mean(rec["tokens"])),
            "timed_padded_tokens_per_step": round(statistics.mean(rec["padded"])) if any(rec["padded"]) else None,
            "real_tokens_per_s": round(sum(rec["tokens"]) / sum(rec["walls"]), 1),
            "profiled_step_ms": round(wall_ms, 1), **shares,
            "other": round(100 - sum(v or 0 for v in shares.values()), 1),
            "between_ms": round(statistics.median(rec["gaps"]) * 1e3, 1),
            "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 1),
                         "calls_per_step": round(e.count / steps, 1)} for e in ops]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbs", default=",".join(VERBS))
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--steps", type=int, default=4, help="timed steps, then as many profiled ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS_DIR / "step_profile.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        report(worker(a.worker, a.warmup, a.steps, a.threads))
        return
    verbs = [v.strip() for v in a.verbs.split(",") if v.strip()]
    bad = [v for v in verbs if v not in VERBS]
    if bad:
        ap.error(f"--verbs: unknown {', '.join(bad)} (choose from {', '.join(VERBS)})")
    peaks = measured_peaks(a.threads)  # in this process, before any worker starts
    rows = []
    for v in verbs:
        print(f"profiling {v} ...", file=sys.stderr, flush=True)
        r = run_worker([__file__, "--worker", v, "--warmup", str(a.warmup), "--steps", str(a.steps), "--threads",
                        str(a.threads)], a.threads, timeout=3600)
        r.setdefault("verb", v)
        r["top"] = ", ".join(f"{o['op']} {o['self_ms_per_step']}" for o in r.get("top_ops", [])[:3])
        rows.append(r)
    cols = [("verb", "verb"), ("precision", "precision"), ("batch_size", "batch"), ("step_ms", "step ms"),
            ("timed_tokens_per_step", "tokens/step"), ("real_tokens_per_s", "tokens/s"),
            ("forward", "forward %"), ("backward", "backward %"), ("optimizer", "optimizer %"), ("other", "other %"),
            ("between_ms", "between ms"), ("top", "top ops (self ms/step)"), ("skipped", "skipped"),
            ("error", "error")]
    print(format_table(rows, cols))
    print(f"peaks at {a.threads} threads: {peaks}")
    write_json(a.out, {"benchmark": "step_profile", "command": "python benchmarks/step_profile.py " +
                       " ".join(sys.argv[1:]), "machine": machine_info(), "peaks": peaks, "warmup": a.warmup,
                       "steps": a.steps, "threads": a.threads, "rows": rows})
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
