"""Serving under load: `lmforge serve` vs llama.cpp's `llama-server`, llama-cpp-python's server, a transformers loop.

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--clients 1,4,16,32] [--requests 4]
                               [--max-tokens-range 16,256] [--stagger 2.0] [--seed 0] [--threads 1]
                               [--impls lmforge,lmforge-plain,llama-server,llama-cpp-python,transformers]
                               [--long-prompt 4000] [--long-streams 16] [--quick]
                               [--llama-server PATH] [--llama-parallel 0] [--slot-ctx 512]
                               [--out benchmarks/results/serve.json]
    python benchmarks/serve.py --adapters 4 [...]   # several LoRA adapters in one server: serve_adapters.py

Workload (issue 12), the same for every server: at each level, C clients (asyncio + httpx, connections
opened before the level). Client k waits a seeded random delay in [0, stagger] s before its first request
(staggered arrivals), then sends `requests` streaming chat requests one after another, each with its own
prompt and a max_tokens drawn uniformly from the range. The draws depend only on --seed and C, so every
server gets the same list. Greedy (temperature 0). All servers stop at EOS or at max_tokens (lmforge has no
ignore_eos, so none is forced past EOS): the prompts ask for long stories so that most requests run to
max_tokens, and the "at max" column says how many did on each server. Tokens are counted from `usage`
(from stream chunks where a server sends none). One untimed warm-up request follows each server start.

Per level and server: tokens/s = completion tokens / wall time from the first request sent to the last
[DONE]; p50/p99 request latency (sent -> [DONE]) and p50/p99 time to first token (sent -> first content
chunk); ratios of tokens/s to llama-server and to llama-cpp-python; "slots" = generations a server runs
together (lmforge: max_concurrent; llama-server: --parallel; the others: 1). p99 over few samples is close
to the max: read it as "worst case seen". The issue's targets are checked at the end (see TARGETS).

The servers (each in its own process on a free loopback port, --threads compute threads each):
  lmforge           lmforge.serve.create_app: continuous batching, max_concurrent = the largest level.
  lmforge-plain     the same with batch invariance off and whole-prompt prefill (--batch-invariant off
                    --prefill-chunk 0): what their cost is measured against, in the same run.
  llama-server      llama.cpp's own server (built with cmake from the llama.cpp that llama-cpp-python's sdist
                    vendors; skipped, with the reason, when the binary is missing) on the same GGUF file:
                    --parallel slots (default: the level's client count, restarted per level), continuous
                    batching (its default), --ctx-size = slots x --slot-ctx.
  llama-cpp-python  `python -m llama_cpp.server` (needs llama-cpp-python[server]): one request at a time,
                    --interrupt_requests False so a new request waits instead of cutting the running stream.
  transformers      a minimal FastAPI app (serve_servers.py): AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)
                    (the same GGUF, dequantized to float32), model.generate + TextIteratorStreamer, one
                    request at a time (a lock): what a plain generate loop behind an HTTP endpoint does.

Building llama-server (CPU, portable, outside the repo; 10 minutes with Ninja on 2 idle cores, 1 h 45 min on 2
cores busy with other work):
    pip download --no-deps --no-binary :all: llama-cpp-python -d /work/llama-src   # then untar it
    cmake -B /work/llama-build -S <sdist>/vendor/llama.cpp -G Ninja -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
          -DCMAKE_BUILD_TYPE=Release
    cmake --build /work/llama-build --target llama-server -j 2

The parts: serve_load.py (the workload and the clients that send it), serve_peers.py (starting, warming up and
stopping each server), serve_servers.py (the Python servers), serve_longprompt.py, serve_adapters.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    format_table,
    load_average,
    machine_info,
    measured_peaks,
    write_json,
)
from benchmarks.serve_load import run_level, workload  # noqa: E402
from benchmarks.serve_longprompt import COLUMNS as LONG_COLUMNS  # noqa: E402
from benchmarks.serve_longprompt import long_prompt_run  # noqa: E402
from benchmarks.serve_peers import (  # noqa: E402
    DEFAULT_LLAMA_SERVER,
    IMPLS,
    PY_SERVERS,
    Peer,
    Server,
    Skip,
    llama_server_version,
    make_peer,
)
from benchmarks.serve_servers import serve_lmforge, serve_transformers  # noqa: E402


# ---- levels (parent) --------------------------------------------------------------------------------------
def bench_impl(peer: Peer, a: argparse.Namespace, log_dir: Path) -> list[dict]:
    """Every level on one server (or one server per level when peer.per_level)."""
    def level(srv: Server, c: int) -> dict:
        print(f"  {peer.name}: {c} client(s) x {a.requests} request(s) ...", file=sys.stderr, flush=True)
        plans = workload(c, a.requests, a.max_tokens_range, a.stagger, a.seed)
        r = asyncio.run(run_level(srv.url, plans, peer.health))
        slots = {"lmforge": max(a.clients), "lmforge-plain": max(a.clients),
                 "llama-server": a.llama_parallel or srv.slots}.get(peer.name, 1)
        return {"impl": peer.name, "startup_s": srv.startup_s, "slots": slots, **r}

    if not peer.per_level:
        with Server(peer, max(a.clients), a, log_dir / f"{peer.name}.log") as srv:
            return [level(srv, c) for c in a.clients]
    rows = []
    for c in a.clients:
        with Server(peer, c, a, log_dir / f"{peer.name}-{c}.log") as srv:
            rows.append(level(srv, c))
    return rows


def bench_long(peer: Peer, a: argparse.Namespace, log_dir: Path) -> dict:
    """The long-prompt scenario on one lmforge server (max_concurrent: the streams plus the long request)."""
    print(f"  {peer.name}: a {a.long_prompt}-token prompt among {a.long_streams} streams ...", file=sys.stderr,
          flush=True)
    try:
        with Server(peer, a.long_streams + 1, a, log_dir / f"{peer.name}-long.log") as srv:
            r = asyncio.run(long_prompt_run(srv.url, a.long_streams, 64 + a.long_prompt // 20, a.long_prompt))
    except RuntimeError as e:
        r = {"error": str(e)}
    return {"impl": peer.name, **r}


# ---- ratios, targets, table -------------------------------------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    """tokens/s against llama-server and llama-cpp-python; greedy text against transformers', per level."""
    by = {(r["impl"], r["clients"]): r for r in rows if "error" not in r and "skipped" not in r}
    for r in by.values():
        for impl, key in (("llama-server", "x_llama_server"), ("llama-cpp-python", "x_llama_cpp_python"),
                          ("lmforge-plain", "x_plain")):
            base = by.get((impl, r["clients"]))
            if base is r and impl == "lmforge-plain":
                continue
            if base and base["tokens_per_s"] and r["tokens_per_s"] is not None:
                r[key] = r["tokens_per_s"] / base["tokens_per_s"]
        ref = by.get(("transformers", r["clients"]))
        if ref:
            shared = [k for k in r["texts"] if k in ref["texts"]]
            r["same_text"] = f"{sum(r['texts'][k] == ref['texts'][k] for k in shared)}/{len(shared)}"


# (what, applies at clients, value from lmforge's row and the peer's, the bar it must reach)
TARGETS: list[tuple[str, Callable[[int], bool], str, Callable[[dict, dict], float | None], float]] = [
    (">= 1.0x llama-server tokens/s", lambda c: c >= 16, "llama-server",
     lambda m, p: m["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None, 1.0),
    ("p99 time to first token below llama-server's (ratio < 1)", lambda c: c >= 16, "llama-server",
     lambda m, p: m["ttft_p99_s"] / p["ttft_p99_s"] if p["ttft_p99_s"] else None, -1.0),
    (">= 2x llama-cpp-python single-slot tokens/s", lambda c: c >= 16, "llama-cpp-python",
     lambda m, p: m["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None, 2.0),
    ("within 10% of llama-server tokens/s (>= 0.9x)", lambda c: c == 1, "llama-server",
     lambda m, p: m["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None, 0.9),
    ("invariance + chunked prefill cost <= 10% (>= 0.9x lmforge-plain tokens/s)", lambda c: c >= 16,
     "lmforge-plain", lambda m, p: m["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None, 0.9),
]


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 12's targets, one line per (target, level) where both rows exist; a negative bar means 'below -bar'."""
    by = {(r["impl"], r["clients"]): r for r in rows if "error" not in r and "skipped" not in r}
    out = []
    for what, at, peer, value, bar in TARGETS:
        for c in sorted({c for _, c in by}):
            m, p = by.get(("lmforge", c)), by.get((peer, c))
            if not (at(c) and m and p):
                continue
            v = value(m, p)
            met = v is not None and (v < -bar if bar < 0 else v >= bar)
            out.append({"clients": c, "target": what, "ratio": v, "met": met})
    return out


COLUMNS = [("clients", "clients"), ("impl", "server"), ("slots", "slots"), ("requests", "requests"),
           ("errors", "errors"), ("completion_tokens", "tokens"), ("at_max", "at max"), ("tokens_per_s", "tokens/s"),
           ("x_llama_server", "x llama-server"), ("x_llama_cpp_python", "x llama-cpp-python"), ("x_plain", "x plain"),
           ("p50_s", "p50 latency s"), ("p99_s", "p99 latency s"), ("ttft_p50_s", "p50 TTFT s"),
           ("ttft_p99_s", "p99 TTFT s"), ("same_text", "same text as transformers")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(x == "--adapters" or x.startswith("--adapters=") for x in argv):  # several LoRA adapters, one server
        from benchmarks.serve_adapters import main as adapters_main

        return adapters_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens-range", default="16,256", help="LO,HI: each request's max_tokens, drawn uniformly")
    p.add_argument("--stagger", type=float, default=2.0, help="clients arrive at seeded random times in [0, S] s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="compute threads in each server")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--llama-server", help=f"llama.cpp's server binary (default {DEFAULT_LLAMA_SERVER})")
    p.add_argument("--llama-parallel", type=int, default=0,
                   help="llama-server --parallel slots (0: the level's client count, one server per level)")
    p.add_argument("--slot-ctx", type=int, default=512, help="context per llama.cpp slot (prompt + max_tokens)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--long-prompt", type=int, default=4000, metavar="WORDS",
                   help="the long-prompt scenario (benchmarks/serve_longprompt.py) on lmforge and lmforge-plain: a "
                        "prompt of about this many tokens arriving among --long-streams streams (0: skip)")
    p.add_argument("--long-streams", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128, help="lmforge's --prefill-chunk (lmforge-plain: 0)")
    p.add_argument("--quick", action="store_true", help="a smoke run: lmforge and lmforge-plain, 1 and 4 "
                   "clients, 1 request of 8-16 tokens, a 600-token long prompt among 4 streams")
    p.add_argument("--out", default=str(RESULTS_DIR / "serve.json"))
    # server-only
    p.add_argument("--server", choices=PY_SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-concurrent", type=int, default=16, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.requests, a.max_tokens_range, a.impls = "1,4", 1, "8,16", "lmforge,lmforge-plain"
        a.long_prompt, a.long_streams = min(a.long_prompt, 600), min(a.long_streams, 4)
    a.clients = [int(c) for c in str(a.clients).split(",") if c.strip()]
    a.max_tokens_arg = a.max_tokens_range
    lo, hi = (int(x) for x in a.max_tokens_range.split(","))
    if not 1 <= lo <= hi:
        p.error(f"--max-tokens-range {a.max_tokens_range}: need 1 <= LO <= HI")
    a.max_tokens_range = (lo, hi)
    if a.server:
        from benchmarks.common import set_threads

        set_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        (serve_lmforge if a.server.startswith("lmforge") else serve_transformers)(a)
        return 0

    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    started = time.time()
    machine = machine_info()
    machine["peaks"] = measured_peaks(a.threads)  # this machine's matmul and copy ceilings, at the servers' threads
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as tmp:
        for impl in impls:
            try:
                rows += bench_impl(make_peer(impl, a), a, Path(tmp))
            except Skip as e:  # said after the table
                rows.append({"impl": impl, "skipped": str(e)})
            except RuntimeError as e:
                print(f"{impl}: FAILED: {e}", file=sys.stderr)
                rows.append({"impl": impl, "error": str(e)})
        long_rows = [bench_long(make_peer(impl, a), a, Path(tmp)) for impl in impls
                     if impl.startswith("lmforge") and a.long_prompt > 0]
    add_ratios(rows)
    table = sorted([r for r in rows if "clients" in r], key=lambda r: (r["clients"], IMPLS.index(r["impl"])))
    print(format_table(table, COLUMNS))
    if long_rows:
        print(format_table(long_rows, LONG_COLUMNS))
    for r in rows:
        if "clients" not in r:
            print(f"{r['impl']}: {r.get('skipped') and 'skipped: ' + r['skipped'] or 'FAILED: ' + r['error']}")
    targets = check_targets(rows)
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        print(f"target at {t['clients']} clients, {t['target']}: {ratio} ({'met' if t['met'] else 'NOT met'})")
    machine["load_average_end"] = load_average()
    machine["llama_server"] = llama_server_version(a)
    payload = {"benchmark": "serve", "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "model": a.model,
               "clients": a.clients, "requests": a.requests, "max_tokens_range": list(a.max_tokens_range),
               "stagger_s": a.stagger, "seed": a.seed, "threads": a.threads, "prefill_chunk": a.prefill_chunk,
               "machine": machine,
               "targets": targets, "results": rows, "long_prompt": long_rows}
    print(f"wrote {write_json(a.out, payload)}")
    return 0 if all("error" not in r and not r.get("errors") for r in rows + long_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
