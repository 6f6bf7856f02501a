"""Time to first token of a chat's second turn, with and without prefix reuse (issue 12 item 4).

    python benchmarks/prefix_ttft.py [--model smollm2-135m-instruct] [--words 700] [--threads 2] [--repeat 3]

Turn 1 is a long user message (about `--words` words) answered with up to 32 tokens; turn 2 appends that
reply and a short question. Both turns go through one `batching.Scheduler` (the server's worker) in-process,
once with `prefix_cache_bytes=0` and once with 256 MB; we report turn 2's time from submit to its first token
(the median of `--repeat` fresh chats, each with a new first message so that no run reuses another's cache),
and whether turn 2's greedy tokens are the same with and without reuse.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading

import torch

from lmforge.generator import Generator
from lmforge.serve.batching import Event, GenRequest, SamplingParams, Scheduler

WORDS = ("the a cat dog sat ran on under mat tree house car blue red small big quickly slowly near far river "
         "city light storm garden window").split()


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


def chat_turn2_ttft(gen: Generator, sched: Scheduler, seed: int, words: int) -> tuple[float, float, int, int, list]:
    rng = random.Random(seed)
    first = " ".join(rng.choice(WORDS) for _ in range(words))
    msgs = [{"role": "user", "content": "Summarize this text in one sentence: " + first}]
    ids1 = gen.tokenizer.encode(gen.format_chat(msgs), add_special_tokens=False)
    t1, reply = run_turn(sched, ids1, 32)
    msgs += [{"role": "assistant", "content": gen.tokenizer.decode(reply, skip_special_tokens=True)},
             {"role": "user", "content": "Now say it in five words."}]
    ids2 = gen.tokenizer.encode(gen.format_chat(msgs), add_special_tokens=False)
    t2, reply2 = run_turn(sched, ids2, 8)
    return t1, t2, len(ids1), len(ids2), reply2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--words", type=int, default=700)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = Generator.load(a.model)
    replies = []
    for label, budget in (("no reuse", 0), ("reuse 256 MB", 256 << 20)):
        sched = Scheduler(gen.model, gen.tokenizer, prefix_cache_bytes=budget)
        run_turn(sched, gen.tokenizer.encode("warm up", add_special_tokens=False), 2)
        rows = [chat_turn2_ttft(gen, sched, 1000 + i, a.words) for i in range(a.repeat)]
        sched.close()
        replies.append([r[4] for r in rows])
        t1 = statistics.median(r[0] for r in rows)
        t2 = statistics.median(r[1] for r in rows)
        print(f"{label:>13}: turn 1 ({rows[0][2]} prompt tokens) TTFT {t1 * 1000:7.1f} ms; "
              f"turn 2 ({rows[0][3]} prompt tokens) TTFT {t2 * 1000:7.1f} ms; "
              f"reused {sched.stats['reused_tokens']} tokens in all")
    print("turn 2 tokens with reuse == without:", replies[0] == replies[1])


if __name__ == "__main__":
    main()
