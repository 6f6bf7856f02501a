"""Time to first token with and without prefix reuse: a chat's second turn, and short chat prompts (issues 12, 36).

    python benchmarks/prefix_ttft.py [--model smollm2-135m-instruct] [--words 700] [--threads 2] [--repeat 3]
                                     [--short 5] [--prefill-chunk N] [--prefix-grain N] [--quick]

Everything goes through one `batching.Scheduler` (the server's worker) in-process, once per configuration:
`no reuse` (prefix_cache_bytes=0), `reuse` (256 MB, batch invariance on: reuse on the prefill chunk grid, whose
first chunk runs in `--prefix-grain` pieces), and `reuse, invariance off` (any prefix, the behaviour before issue
36). Scenarios, each a median:
- turn 2: turn 1 is a long user message (about `--words` words) answered with up to 32 tokens; turn 2 appends
  that reply and a short question; time from submit to turn 2's first token, over `--repeat` fresh chats (a new
  first message each, so no run reuses another's cache).
- same short prompt: one short chat prompt (the template's system prompt and a one-line question) sent `--short`
  times in a row; the time to first token of the 2nd..last.
- shared template: `--short` different one-line questions (sharing only the template's system prompt).
Also whether each configuration's greedy tokens equal `no reuse`'s. The table is printed; JSON goes to
benchmarks/results/prefix_ttft.json (--out).
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    format_table,
    load_average,
    machine_info,
    measured_peaks,
    set_threads,
    write_json,
)
from lmforge.generator import Generator  # noqa: E402
from lmforge.serve.batching import Scheduler  # noqa: E402
from lmforge.serve.requests import Event, GenRequest, SamplingParams  # noqa: E402

WORDS = ("the a cat dog sat ran on under mat tree house car blue red small big quickly slowly near far river "
         "city light storm garden window").split()
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "Why is the sky blue?",
             "How many legs does a spider have?", "Give me a synonym for happy.", "What does a bee make?",
             "Which planet is the largest?", "What is two plus two?"]


def run_turn(sched: Scheduler, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """-> (seconds to the first token, completion token ids)."""
    done, toks = threading.Event(), []

    def emit(ev: Event) -> None:
        if ev.kind == "text":
            toks.extend(lp.token for lp in ev.logprobs or [])
        else:
            done.set()

    req = GenRequest(ids, SamplingParams(max_tokens=max_tokens, logprobs=0), emit)
    sched.submit(req)
    done.wait(600)
    return req.first_token_at - req.enqueued_at, toks


def chat_ids(gen: Generator, msgs: list[dict]) -> list[int]:
    return gen.tokenizer.encode(gen.format_chat(msgs), add_special_tokens=False)


def chat_turn2(gen: Generator, sched: Scheduler, seed: int, words: int) -> tuple[float, float, int, int, list]:
    rng = random.Random(seed)
    first = " ".join(rng.choice(WORDS) for _ in range(words))
    msgs = [{"role": "user", "content": "Summarize this text in one sentence: " + first}]
    ids1 = chat_ids(gen, msgs)
    t1, reply = run_turn(sched, ids1, 32)
    msgs += [{"role": "assistant", "content": gen.tokenizer.decode(reply, skip_special_tokens=True)},
             {"role": "user", "content": "Now say it in five words."}]
    ids2 = chat_ids(gen, msgs)
    t2, reply2 = run_turn(sched, ids2, 8)
    return t1, t2, len(ids1), len(ids2), reply2


def scheduler(gen: Generator, cache_mb: int, invariant: bool, a: argparse.Namespace) -> Scheduler:
    kw: dict = {"prefix_cache_bytes": cache_mb << 20, "batch_invariant": invariant}
    params = inspect.signature(Scheduler).parameters
    if a.prefill_chunk is not None:
        kw["prefill_chunk"] = a.prefill_chunk
    if a.prefix_grain is not None and "prefix_grain" in params:  # (older lmforge: no grain, the chunk grid only)
        kw["prefix_grain"] = a.prefix_grain
    return Scheduler(gen.model, gen.tokenizer, **kw)


def run_config(gen: Generator, label: str, cache_mb: int, invariant: bool, a: argparse.Namespace) -> dict:
    sched = scheduler(gen, cache_mb, invariant, a)
    try:
        run_turn(sched, chat_ids(gen, [{"role": "user", "content": "warm up"}]), 2)
        chats = [chat_turn2(gen, sched, 1000 + i, a.words) for i in range(a.repeat)]
        q = QUESTIONS[0]
        same = [run_turn(sched, chat_ids(gen, [{"role": "user", "content": q}]), 8) for _ in range(a.short)]
        shared = [run_turn(sched, chat_ids(gen, [{"role": "user", "content": QUESTIONS[1 + i % 7] + f" ({i})"}]), 8)
                  for i in range(a.short)]
    finally:
        sched.close()
    return {"config": label, "turn1_tokens": chats[0][2], "turn2_tokens": chats[0][3],
            "turn1_ttft_s": statistics.median(c[0] for c in chats),
            "turn2_ttft_s": statistics.median(c[1] for c in chats),
            "short_tokens": len(chat_ids(gen, [{"role": "user", "content": q}])),
            "same_short_ttft_s": statistics.median(t for t, _ in same[1:]),
            "same_short_first_s": same[0][0],
            "shared_template_ttft_s": statistics.median(t for t, _ in shared[1:]),
            "reused_tokens": sched.stats["reused_tokens"],
            "tokens": [[c[4] for c in chats], [t for _, t in same], [t for _, t in shared]]}


COLUMNS = [("config", "configuration"), ("turn2_tokens", "turn 2 tokens"), ("turn2_ttft_s", "turn 2 TTFT s"),
           ("short_tokens", "short prompt tokens"), ("same_short_first_s", "short, 1st TTFT s"),
           ("same_short_ttft_s", "same short again TTFT s"), ("shared_template_ttft_s", "shared template TTFT s"),
           ("reused_tokens", "reused tokens"), ("same_tokens", "tokens == no reuse")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--words", type=int, default=700)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="fresh chats for the turn-2 median")
    ap.add_argument("--short", type=int, default=5, help="short prompts per short scenario")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="the scheduler's prefill_chunk (its default)")
    ap.add_argument("--prefix-grain", type=int, default=None, help="the chunk grid's step in the first chunk")
    ap.add_argument("--configs", default="no reuse,reuse,reuse invariance off")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 100 words, 1 chat, 3 short prompts")
    ap.add_argument("--out", default=str(RESULTS_DIR / "prefix_ttft.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.words, a.repeat, a.short = min(a.words, 100), 1, 3
    set_threads(a.threads)
    torch.set_num_threads(a.threads)
    started = time.time()
    machine = machine_info()
    machine["peaks"] = measured_peaks(a.threads)
    gen = Generator.load(a.model)
    configs = {"no reuse": (0, True), "reuse": (256, True), "reuse invariance off": (256, False)}
    rows = [run_config(gen, name, *configs[name], a) for name in a.configs.split(",") if name in configs]
    for r in rows:
        r["same_tokens"] = r["tokens"] == rows[0]["tokens"]
    print(format_table(rows, COLUMNS))
    payload = {"benchmark": "prefix_ttft", "model": a.model, "threads": a.threads, "words": a.words,
               "repeat": a.repeat, "short": a.short, "prefill_chunk": a.prefill_chunk, "prefix_grain": a.prefix_grain,
               "quick": a.quick, "machine": machine, "load_average_after": load_average(),
               "seconds": round(time.time() - started, 1), "results": rows}
    print("wrote", write_json(a.out, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
