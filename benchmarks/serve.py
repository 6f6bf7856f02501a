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
  transformers      a minimal FastAPI app in this file: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)
                    (the same GGUF, dequantized to float32), model.generate + TextIteratorStreamer, one
                    request at a time (a lock): what a plain generate loop behind an HTTP endpoint does.

Building llama-server (CPU, portable, outside the repo; 10 minutes with Ninja on 2 idle cores, 1 h 45 min on 2
cores busy with other work):
    pip download --no-deps --no-binary :all: llama-cpp-python -d /work/llama-src   # then untar it
    cmake -B /work/llama-build -S <sdist>/vendor/llama.cpp -G Ninja -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
          -DCMAKE_BUILD_TYPE=Release
    cmake --build /work/llama-build --target llama-server -j 2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    load_average,
    machine_info,
    measured_peaks,
    thread_env,
    write_json,
)
from benchmarks.serve_longprompt import COLUMNS as LONG_COLUMNS  # noqa: E402
from benchmarks.serve_longprompt import long_prompt_run  # noqa: E402
from benchmarks.serve_servers import serve_lmforge, serve_transformers  # noqa: E402

IMPLS = ("lmforge", "lmforge-plain", "llama-server", "llama-cpp-python", "transformers")
PY_SERVERS = ("lmforge", "lmforge-plain", "transformers")  # started as `python serve.py --server NAME`
DEFAULT_LLAMA_SERVER = Path("/work/llama-build/bin/llama-server")
TOPICS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat who runs a bakery",
          "the first day on Mars", "a dragon afraid of heights", "a detective in a tiny village",
          "a violin found in an attic", "two friends lost in a forest", "a train that never stops",
          "a garden on the moon", "a clock that runs backwards", "a whale who sings opera",
          "a library with no books", "a boy who talks to birds", "an old map and a treasure",
          "a snowman in summer", "a chef who cannot taste", "a river that flows uphill",
          "a kite that flies at night", "a bridge between two islands"]
STYLES = ["a long", "a long, funny", "a long, sad", "a long, mysterious", "a long, exciting"]


def prompt(i: int) -> str:
    """The i-th distinct prompt; it asks for a long text so that few requests stop at EOS before max_tokens."""
    style, topic = STYLES[(i // len(TOPICS)) % len(STYLES)], TOPICS[i % len(TOPICS)]
    part = f" (part {i // (len(TOPICS) * len(STYLES)) + 1})" if i >= len(TOPICS) * len(STYLES) else ""
    return f"Write {style} story about {topic}{part}, with many chapters and as much detail as you can."


@dataclass(frozen=True)
class ClientPlan:
    """One client of a level: when it arrives and what it asks for (the same for every server)."""

    delay_s: float  # before its first request; the rest follow back to back
    prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]


def workload(clients: int, requests: int, tokens: tuple[int, int], stagger_s: float, seed: int) -> list[ClientPlan]:
    """Seeded by (seed, clients) only: every server, and every run with the same flags, gets the same plans."""
    rng = random.Random(seed * 1_000_003 + clients)
    plans = []
    for k in range(clients):
        delay = rng.uniform(0.0, stagger_s) if clients > 1 else 0.0
        ids = range(k * requests, (k + 1) * requests)
        plans.append(ClientPlan(delay, tuple(prompt(i) for i in ids),
                                tuple(rng.randint(tokens[0], tokens[1]) for _ in ids)))
    return plans


# ---- how each server is started -----------------------------------------------------------------------------
class Skip(Exception):
    """A peer that cannot run here (binary or package missing): reported with its reason, not a failure."""


@dataclass
class Peer:
    """How to start one server: argv for (port, parallel slots), and the path that answers 200 once it is ready."""

    name: str
    command: Callable[[int, int], list[str]]
    health: str = "/health"
    per_level: bool = False  # restarted for each level, with as many slots as the level has clients


def _gguf(model: str) -> Path:
    from lmforge.checkpoints.registry import resolve

    path = resolve(model)[0]
    if not (path.is_file() and path.suffix == ".gguf"):
        raise Skip(f"needs a GGUF model file, and {model} is {path}")
    return path


def make_peer(impl: str, a: argparse.Namespace) -> Peer:
    """The Peer for impl, or Skip(reason) when it cannot run on this machine."""
    t = str(a.threads)
    if impl in PY_SERVERS:
        script = str(Path(__file__).resolve())
        return Peer(impl, lambda port, _: [sys.executable, script, "--server", impl, "--model", a.model,
                                           "--port", str(port), "--max-tokens-range", a.max_tokens_arg,
                                           "--max-concurrent", str(max(a.clients)),
                                           "--prefill-chunk", str(a.prefill_chunk)])
    if impl == "llama-server":
        exe = Path(a.llama_server) if a.llama_server else DEFAULT_LLAMA_SERVER
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise Skip(f"no llama-server binary at {exe} (build llama.cpp's server target with cmake, or pass "
                       "--llama-server PATH)")
        gguf = _gguf(a.model)

        def llama_server(port: int, slots: int) -> list[str]:
            n = a.llama_parallel or slots
            return [str(exe), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--threads", t,
                    "--threads-batch", t, "--parallel", str(n), "--ctx-size", str(n * a.slot_ctx),
                    "--cont-batching", "--n-gpu-layers", "0"]

        return Peer(impl, llama_server, per_level=not a.llama_parallel)
    if impl == "llama-cpp-python":
        missing = [m for m in ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise Skip(f"python modules missing: {', '.join(missing)} (pip install 'llama-cpp-python[server]')")
        gguf = _gguf(a.model)
        return Peer(impl, lambda port, _: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                           "--host", "127.0.0.1", "--port", str(port), "--n_threads", t,
                                           "--n_threads_batch", t, "--n_ctx", str(a.slot_ctx),
                                           "--interrupt_requests", "False"],
                    health="/v1/models")
    raise ValueError(f"unknown server {impl!r}; choose from {', '.join(IMPLS)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running server process on a free loopback port; a context manager that stops it on exit."""

    def __init__(self, peer: Peer, slots: int, a: argparse.Namespace, log_path: Path) -> None:
        self.peer, self.slots, self.a, self.log_path = peer, slots, a, log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        import httpx

        cmd = self.peer.command(self.port, self.slots)
        print(f"  starting {self.peer.name}: {' '.join(cmd[:2])} ...", file=sys.stderr, flush=True)
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(cmd, env=thread_env(self.a.threads), cwd=REPO_ROOT, stdout=logf,
                                         stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
                    raise RuntimeError(f"{self.peer.name} exited ({self.proc.returncode}): {tail}")
                try:
                    if httpx.get(self.url + self.peer.health, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > self.a.start_timeout:
                    raise RuntimeError(f"{self.peer.name} did not answer {self.peer.health} within "
                                       f"{self.a.start_timeout}s")
                time.sleep(0.5)
            self.startup_s = time.monotonic() - t0
            warm = asyncio.run(run_level(self.url, [ClientPlan(0.0, ("Say hello.",), (8,))], self.peer.health))
            if warm["errors"]:
                raise RuntimeError(f"{self.peer.name}: warm-up request failed: {warm['first_error']}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- load generator (parent) ------------------------------------------------------------------------------
async def one_request(ac, text: str, max_tokens: int) -> dict:
    """One streamed request. A connection the server closed before answering (a keep-alive connection it timed
    out, as llama-server's HTTP library does after 5 s idle) is retried once on a fresh one; any other transport
    failure is recorded as this request's error, not raised, so one bad request cannot lose a level's results."""
    import httpx

    for attempt in (0, 1):
        try:
            return await _one_request(ac, text, max_tokens)
        except (httpx.RemoteProtocolError, httpx.ConnectError) as e:
            stale = isinstance(e, httpx.ConnectError) or "without sending a response" in str(e)
            if attempt or not stale:
                return {"error": f"{type(e).__name__}: {e}"}
        except httpx.HTTPError as e:
            return {"error": f"{type(e).__name__}: {e}"}
    raise AssertionError("unreachable")


async def _one_request(ac, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, pieces, usage, finish = None, [], None, None
    async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                finish = ch.get("finish_reason") or finish
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    pieces.append(piece)
    end = time.perf_counter()
    n = (usage or {}).get("completion_tokens")
    return {"sent": t0, "end": end, "latency_s": end - t0, "ttft_s": (first or end) - t0, "text": "".join(pieces),
            "completion_tokens": n if n is not None else len(pieces), "tokens_from": "usage" if n is not None
            else "chunks", "finish_reason": finish, "max_tokens": max_tokens, "prompt": text}


async def run_level(url: str, plans: list[ClientPlan], ping: str = "/health") -> dict:
    import httpx

    n = len(plans)
    # idle connections expire before llama-server's 5 s keep-alive timeout closes them under us
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2, keepalive_expiry=3.0)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as ac:
        async def client(plan: ClientPlan) -> list[dict]:
            await asyncio.sleep(plan.delay_s)
            return [await one_request(ac, p, m) for p, m in zip(plan.prompts, plan.max_tokens)]

        # open every client's connection first, so the level measures the server, not TCP connects
        await asyncio.gather(*(ac.get(ping) for _ in range(n)))
        per_client = await asyncio.gather(*(client(p) for p in plans))
    res = [r for rs in per_client for r in rs]
    ok = [r for r in res if "error" not in r]
    wall = max(r["end"] for r in ok) - min(r["sent"] for r in ok) if ok else 0.0
    tokens = sum(r["completion_tokens"] for r in ok)
    return {"clients": n, "requests": len(res), "errors": len(res) - len(ok), "wall_s": wall,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else None,
            "at_max": f"{sum(r['completion_tokens'] >= r['max_tokens'] for r in ok)}/{len(ok)}",
            "p50_s": _pct([r["latency_s"] for r in ok], 50), "p99_s": _pct([r["latency_s"] for r in ok], 99),
            "ttft_p50_s": _pct([r["ttft_s"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft_s"] for r in ok], 99),
            "tokens_from": sorted({r["tokens_from"] for r in ok}),
            "texts": {r["prompt"]: r["text"] for r in ok}, "load_average": load_average(),
            "first_error": next((r["error"] for r in res if "error" in r), None)}


def _pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


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


def _llama_server_version(a: argparse.Namespace) -> str | None:
    """`llama-server --version` (the llama.cpp commit), for the results file; None when there is no binary."""
    exe = Path(a.llama_server) if a.llama_server else DEFAULT_LLAMA_SERVER
    if not exe.is_file():
        return None
    try:
        p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " | ".join(ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("version", "built")))


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
    machine["llama_server"] = _llama_server_version(a)
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
