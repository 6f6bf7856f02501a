"""The server's prompt-lookup speculative decoding at batch 1 (serve/speculate.py): one client at a time.

    python benchmarks/serve_speculative.py [--quick] [--docs 5] [--threads 2] [--quantize none|auto]
                                           [--out benchmarks/results/serve_speculative.json]

Model: smollm2-135m-instruct; --quantize none (the default) runs it dequantized to float32, where the server's
--speculative auto turns prompt lookup on; auto: its Q4_1 blocks on the int4 path (auto is off there, so the
requests name prompt-lookup). The app runs in-process (BackgroundServer, one loopback client). Workloads, each
item sent once with `speculative: "off"` and once with "prompt-lookup" (alternating which goes first), greedy, after
a warm-up pass over the first two items with prompt lookup (the traces of the steps and of the verifications, one
per round size and cache length, are made there, mostly; the prefix cache is off):
  ask        POST /v1/answer: the first question of each of the last --docs paragraphs of
             ../shared/data/qa/nyt_v1.0.json (SQuADShifts), max_tokens 64
  summarize  POST /v1/summarize: the last --docs documents of ../shared/data/summarization/wikilingua_en_1k.jsonl,
             max_tokens 160
Figures from each reply's `timings`: decode tok/s = tokens after the first / time after the first token, summed
over the items; speedup = the sum of `total_ms` (queue + prefill + decode) without / with; `identical` counts items
whose reply (text) is the same both ways; rounds / drafted / accepted come from GET /health. Needs ../shared/data
(absent: the three built-in ask items run instead, with a note).
"""

from __future__ import annotations

import argparse
import json
import sys
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
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
BUILTIN = [  # for a smoke run without ../shared/data
    {"context": "The Eiffel Tower was built for the 1889 World's Fair in Paris. Gustave Eiffel's company designed "
                "and built it. It is 330 metres tall and was the tallest man-made structure in the world until "
                "1930.", "question": "Who designed and built the Eiffel Tower?"},
    {"context": "Photosynthesis lets plants turn light, water and carbon dioxide into glucose and oxygen. It takes "
                "place in the chloroplasts, which hold the green pigment chlorophyll.",
     "question": "Where does photosynthesis take place?"},
    {"context": "The Amazon river flows through Peru, Colombia and Brazil into the Atlantic Ocean. It carries more "
                "water than any other river and its basin holds the largest rainforest on Earth.",
     "question": "Which countries does the Amazon flow through?"},
]


def _ask_items(n: int) -> list[dict]:
    data = json.loads((DATA / "qa" / "nyt_v1.0.json").read_text())["data"]
    paras = [p for art in data for p in art["paragraphs"] if p["qas"]]
    return [{"context": p["context"], "question": p["qas"][0]["question"]} for p in paras[-n:]]


def _summarize_items(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (DATA / "summarization" / "wikilingua_en_1k.jsonl").read_text().split("\n")
            if x.strip()]
    return [{"text": r["document"]} for r in rows[-n:]]


def _pairs(url: str, path: str, items: list[dict], max_tokens: int, key: str) -> dict:
    import httpx

    def stats() -> dict:
        g = httpx.get(url + "/health", timeout=30).json()["generation"]
        return {k: g[k] for k in ("spec_rounds", "spec_drafted", "spec_accepted")}

    for item in items[:2]:  # warm-up: traces
        httpx.post(url + path, json={**item, "max_tokens": max_tokens, "speculative": "prompt-lookup"},
                   timeout=600).raise_for_status()
    tot = {"off": [0.0, 0.0, 0], "prompt-lookup": [0.0, 0.0, 0]}  # total ms, decode ms, tokens after the first
    same, n_tok = 0, 0
    before = stats()
    for i, item in enumerate(items):
        replies = {}
        for mode in (("off", "prompt-lookup") if i % 2 == 0 else ("prompt-lookup", "off")):
            r = httpx.post(url + path, json={**item, "max_tokens": max_tokens, "speculative": mode}, timeout=600)
            r.raise_for_status()
            body = r.json()
            replies[mode] = body[key]
            t = body["timings"]
            tot[mode][0] += t["total_ms"]
            tot[mode][1] += t["total_ms"] - t["time_to_first_token_ms"]
            tot[mode][2] += t["completion_tokens"] - 1
        same += replies["off"] == replies["prompt-lookup"]
        n_tok += body["timings"]["completion_tokens"]
    after = stats()
    spec = {k: after[k] - before[k] for k in after}
    off, on = tot["off"], tot["prompt-lookup"]
    n = len(items)
    return {"items": n, "new_tokens": n_tok, "off_tok_s": round(off[2] / off[1] * 1e3, 1),
            "spec_tok_s": round(on[2] / on[1] * 1e3, 1), "decode_speedup": round(on[2] / on[1] / (off[2] / off[1]), 2),
            "speedup": round(off[0] / on[0], 2), "identical": f"{same}/{n}", "rounds": spec["spec_rounds"],
            "acceptance": round(spec["spec_accepted"] / max(spec["spec_drafted"], 1), 3),
            "tokens_per_round": round((spec["spec_accepted"] + spec["spec_rounds"]) / max(spec["spec_rounds"], 1), 2)}


def run(quick: bool, docs: int, threads: int, quantize: str, out: str) -> None:
    set_threads(threads)
    from lmforge.generator import Generator
    from lmforge.serve import BackgroundServer, ServeSettings, create_app

    gen = Generator.load(MODEL, quantize=quantize)
    app = create_app(gen, settings=ServeSettings(max_tokens=256, prefix_cache_mb=0))
    n = 4 if quick else docs
    work = []
    if DATA.is_dir():
        work.append(("ask", "/v1/answer", _ask_items(n), 64, "answer"))
        if not quick:
            work.append(("summarize", "/v1/summarize", _summarize_items(n), 160, "summary"))
    else:
        print(f"{DATA} is absent: running the built-in ask items only", file=sys.stderr)
        work.append(("ask (built-in)", "/v1/answer", BUILTIN, 64, "answer"))
    rows = []
    with BackgroundServer(app) as srv:
        for name, path, items, m, key in work:
            print(f"running {name} on {len(items)} items (+ a warm-up pass) ...", file=sys.stderr, flush=True)
            rows.append({"workload": name, **_pairs(srv.url, path, items, m, key), "note": gen.runs_on})
            print(rows[-1], file=sys.stderr, flush=True)
    cols = [("workload", "workload"), ("items", "items"), ("new_tokens", "new tokens"),
            ("off_tok_s", "plain decode tok/s"), ("spec_tok_s", "speculative decode tok/s"),
            ("decode_speedup", "decode speedup"), ("speedup", "end-to-end speedup"), ("identical", "identical"),
            ("acceptance", "acceptance"), ("tokens_per_round", "tokens/round"), ("note", "note")]
    print(format_table(rows, cols))
    machine = {**machine_info(), "peaks": measured_peaks(threads)}
    write_json(out, {"machine": machine, "model": MODEL, "quantize": quantize, "threads": threads, "quick": quick,
                     "peak_mb": round(peak_rss_mb()), "rows": rows})
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 ask items, no summaries")
    p.add_argument("--docs", type=int, default=5, help="items per workload (default: 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", choices=["none", "auto"], default="none",
                   help="none: float32 (where --speculative auto is on); auto: the Q4_1 int4 path")
    p.add_argument("--out", default=None, help="default: benchmarks/results/serve_speculative[_int4].json")
    a = p.parse_args(argv)
    out = a.out or str(RESULTS_DIR / ("serve_speculative.json" if a.quantize == "none" else
                                      "serve_speculative_int4.json"))
    run(a.quick, a.docs, a.threads, a.quantize, out)


if __name__ == "__main__":
    main()
