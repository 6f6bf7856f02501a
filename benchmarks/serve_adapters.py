"""Several LoRA adapters in one server (issue 38 item 3): 16 clients spread over 4 adapters against 16 clients on
the base alone, in the same server process, and that process's memory against one process per adapter.

    python benchmarks/serve_adapters.py [--model smollm2-135m-instruct] [--adapters 4] [--clients 16]
                                        [--requests 2] [--max-tokens 64] [--rank 8] [--targets q,v]
                                        [--adapter-dirs DIR,DIR,...] [--threads 1] [--quick]
                                        [--out benchmarks/results/serve_adapters.json]
    (also: python benchmarks/serve.py --adapters 4 [same flags])

One `lmforge serve` process (a subprocess on a free loopback port, --threads compute threads) runs these phases:
  base         the base alone, no adapter loaded (no layer is wrapped): the reference tokens/s;
  load         N adapters through POST /v1/adapters (time per load, RSS after);
  adapters     C clients, client k on adapter k mod N (`model` = the adapter's name): mixed-adapter batches;
  base+loaded  C clients on the base while the adapters stay loaded (what the wrapped layers cost base rows).
Each client sends `requests` streaming chat requests back to back (greedy, max_tokens each; the prompts ask for
long stories so rows run to max_tokens); all clients start together. tokens/s = completion tokens (from `usage`)
/ wall time from the first request to the last [DONE]. Target: adapters >= 0.8x base.

Memory: the server's VmRSS after the base phase (one base) and after the adapters phase (one base + N adapters),
against N processes each holding the base and one adapter, estimated as N x the one-base RSS (no N processes are
started: on a 2-core machine they would only fight for the cores).

Adapters: --adapter-dirs (trained runs, e.g. those of docs/adapters.md) or, by default, N random rank-`rank`
LoRA adapters on `targets`, written to a temporary dir with lmforge's PEFT writer: B is small random noise (not
zero, so every adapter product runs and changes the numbers) and the texts stay close to the base's, so rows
run to max_tokens as the base's do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    machine_info,
    measured_peaks,
    stream_chat,
    thread_env,
    write_json,
)
from benchmarks.serve_peers import free_port  # noqa: E402

TOPICS = ["a robot who learns to paint", "a lighthouse keeper and a storm", "a cat who runs a bakery",
          "the first day on Mars", "a dragon afraid of heights", "a detective in a tiny village",
          "a violin found in an attic", "two friends lost in a forest", "a train that never stops",
          "a garden on the moon", "a clock that runs backwards", "a whale who sings opera"]


def prompt(i: int) -> str:
    return f"Write a long story about {TOPICS[i % len(TOPICS)]} (part {i // len(TOPICS) + 1}), with many chapters."


# ---- the server (subprocess side) ---------------------------------------------------------------------------
def serve(a: argparse.Namespace) -> None:
    import uvicorn

    from benchmarks.common import set_threads
    from lmforge.generator import Generator
    from lmforge.serve import ServeSettings, create_app

    set_threads(a.threads)
    gen = Generator.load(a.model)
    settings = ServeSettings(max_concurrent=a.clients, max_queue=256, max_tokens=max(64, a.max_tokens),
                             max_adapters=max(8, a.adapters))
    uvicorn.run(create_app(gen, settings=settings), host="127.0.0.1", port=a.port, log_level="warning",
                access_log=False)


def make_adapters(model: str, n: int, rank: int, targets: str, out: Path) -> list[Path]:
    """n random LoRA adapters for `model`'s shapes (no float copy of the model: the shadow of serve/adapters.py)."""
    import torch

    from lmforge.checkpoints import load_checkpoint
    from lmforge.checkpoints.peft import save_adapters
    from lmforge.model.lora import LoraConfig, inject_lora
    from lmforge.serve.adapters import shadow_of

    cfg = load_checkpoint(model, quantized=True, tokenizer=False).cfg
    dirs = []
    for i in range(n):
        shadow = shadow_of(cfg)
        inject_lora(shadow, LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                if name.endswith("lora_A"):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 2e-3)
        dirs.append(save_adapters(shadow, out / f"adapter{i}", base_model=model))
    return dirs


# ---- clients (parent side) ----------------------------------------------------------------------------------
async def one_request(ac, model: str | None, text: str, max_tokens: int) -> dict:
    """One streamed request on `model` (an adapter's name; None: the base): its time to first token and tokens."""
    r = await stream_chat(ac, text, max_tokens, model=model)
    if "error" in r:
        return r
    return {"sent": r["sent"], "end": r["end"], "ttft_s": r["ttft_s"], "tokens": r["usage"].get("completion_tokens", 0)}


async def run_phase(url: str, models: list[str | None], requests: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(models) + 4, max_keepalive_connections=len(models) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as ac:
        async def client(k: int, model: str | None) -> list[dict]:
            return [await one_request(ac, model, prompt(k * requests + j), max_tokens) for j in range(requests)]

        t0 = time.perf_counter()
        res = [r for rs in await asyncio.gather(*(client(k, m) for k, m in enumerate(models))) for r in rs]
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in res if "error" in r]
    ok = [r for r in res if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    return {"requests": len(res), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "at_max": sum(r["tokens"] >= max_tokens for r in ok),
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None}


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith(("VmRSS:", "VmHWM:")):
            out[ln.split(":")[0]] = round(int(ln.split()[1]) / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapters", type=int, default=4, help="adapters loaded and spread over the clients")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=8, help="random adapters: LoRA rank")
    p.add_argument("--targets", default="q,v", help="random adapters: the layers they adapt")
    p.add_argument("--adapter-dirs", default="", help="comma-separated trained adapter dirs instead of random ones")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads in the server (as serve.py: the other core runs the clients)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 request of 16 tokens per client")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", default=str(RESULTS_DIR / "serve_adapters.json"))
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.server:
        serve(a)
        return 0
    if a.quick:
        a.requests, a.max_tokens = 1, 16
    import httpx

    tmp = tempfile.TemporaryDirectory(prefix="lmforge-adapters-")
    if a.adapter_dirs:
        dirs = [Path(d) for d in a.adapter_dirs.split(",") if d]
        a.adapters = len(dirs)
    else:
        t0 = time.perf_counter()
        dirs = make_adapters(a.model, a.adapters, a.rank, a.targets, Path(tmp.name))
        print(f"wrote {len(dirs)} random adapters in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--server", "--port", str(port), "--model", a.model,
           "--clients", str(a.clients), "--adapters", str(a.adapters), "--max-tokens", str(a.max_tokens),
           "--threads", str(a.threads)]
    log_path = Path(tmp.name) / "server.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=thread_env(a.threads), cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
    phases: dict[str, dict] = {}
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {log_path.read_text()[-800:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > a.start_timeout:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        asyncio.run(run_phase(url, [None], 1, 8))  # warm-up (untimed)
        names = [f"adapter{i}" for i in range(a.adapters)]
        clients_base = [None] * a.clients
        clients_ad = [names[k % a.adapters] for k in range(a.clients)]
        print("phase base ...", file=sys.stderr, flush=True)
        phases["base"] = {**asyncio.run(run_phase(url, clients_base, a.requests, a.max_tokens)), **rss_mb(proc.pid)}
        loads = []
        for name, d in zip(names, dirs):
            t = time.perf_counter()
            r = httpx.post(url + "/v1/adapters", json={"name": name, "path": str(d)}, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"loading {d}: {r.text}")
            loads.append(time.perf_counter() - t)
        phases["load"] = {"adapters": len(loads), "load_s_each": round(sum(loads) / len(loads), 3), **rss_mb(proc.pid)}
        asyncio.run(run_phase(url, names, 1, 8))  # warm-up of the adapter path (untimed)
        print("phase adapters ...", file=sys.stderr, flush=True)
        phases["adapters"] = {**asyncio.run(run_phase(url, clients_ad, a.requests, a.max_tokens)), **rss_mb(proc.pid)}
        print("phase base+loaded ...", file=sys.stderr, flush=True)
        phases["base+loaded"] = {**asyncio.run(run_phase(url, clients_base, a.requests, a.max_tokens)),
                                 **rss_mb(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    base_tps = phases["base"]["tokens_per_s"] or 0.0
    rows = []
    for name in ("base", "adapters", "base+loaded"):
        ph = phases[name]
        rows.append({"phase": name, "clients": a.clients, "adapters": a.adapters if name == "adapters" else 0,
                     "tokens": ph["tokens"], "at_max": ph["at_max"], "errors": ph["errors"],
                     "tokens_per_s": ph["tokens_per_s"], "vs_base": round(ph["tokens_per_s"] / base_tps, 3)
                     if base_tps and ph["tokens_per_s"] else None, "ttft_p50_s": ph["ttft_p50_s"],
                     "rss_mb": ph.get("VmRSS")})
    one_base = phases["base"].get("VmRSS") or 0.0
    memory = {"one_process_rss_mb": phases["adapters"].get("VmRSS"), "one_process_peak_mb": phases["adapters"].get(
        "VmHWM"), "one_base_rss_mb": one_base, "n_processes_estimate_mb": round(a.adapters * one_base, 1),
        "estimate": f"{a.adapters} x the one-base RSS (no {a.adapters} processes were started)"}
    ratio = rows[1]["vs_base"]
    target = {"target": "adapters >= 0.8x base tokens/s", "ratio": ratio, "met": ratio is not None and ratio >= 0.8}
    print(format_table(rows, [("phase", "phase"), ("clients", "clients"), ("adapters", "adapters"),
                              ("tokens", "tokens"), ("at_max", "at max"), ("errors", "errors"),
                              ("tokens_per_s", "tokens/s"), ("vs_base", "vs base"), ("ttft_p50_s", "TTFT p50 s"),
                              ("rss_mb", "RSS MB")]))
    print(f"\nload: {phases['load']['load_s_each']} s per adapter; memory: one process {memory['one_process_rss_mb']} "
          f"MB RSS (peak {memory['one_process_peak_mb']}) vs ~{memory['n_processes_estimate_mb']} MB for "
          f"{a.adapters} processes ({memory['estimate']})")
    print(f"target {target['target']}: {ratio} -> {'met' if target['met'] else 'NOT met'}")
    payload = {"benchmark": "serve_adapters", "argv": sys.argv[1:], "config": {k: v for k, v in vars(a).items()
                                                                                if k not in ("server", "port")},
               "rows": rows, "phases": phases, "memory": memory, "target": target,
               "machine": machine_info(), "peaks": measured_peaks(a.threads), "time": time.strftime("%Y-%m-%d %H:%M")}
    print(f"wrote {write_json(a.out, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
