"""Shared helpers for the benchmarks: timing, peak memory, worker subprocesses, a streamed
chat client for the serving benchmarks, tables, JSON, machine info.

Each implementation under test runs in its own subprocess (`run_worker`), so that the peak memory one
library reaches is not mixed with the other's, and each starts from the same cold state.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
_MARK = "@@BENCH_RESULT@@ "  # prefix of the one stdout line a worker reports on


# ---- threads ---------------------------------------------------------------------------------------
def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker: BLAS/OpenMP pools sized before torch is imported, quiet tokenizers."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def set_threads(threads: int) -> None:
    """Pin torch's intra-op and inter-op pools (call in the worker, right after importing torch)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


# ---- timing ----------------------------------------------------------------------------------------
def time_fn(fn: Callable[[], Any], iters: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `iters` calls of fn after `warmup` untimed ones (first calls pay one-off costs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median (the figure we quote: robust to a noisy neighbour), min and max."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times)}


# ---- memory ----------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    """Resident set size now, MB (1 MB = 2**20 bytes)."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak RSS of this process so far, MB: getrusage's ru_maxrss (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark (Linux: write 5 to /proc/self/clear_refs).

    Without the reset, a peak reached while loading (e.g. dequantizing a GGUF) would hide the peak of the
    forward. Returns False where the kernel does not allow it; then the forward peak is an upper bound.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss_mb() <= rss_mb() + 1.0


# ---- workers ---------------------------------------------------------------------------------------
def report(result: dict[str, Any]) -> None:
    """Worker side: hand the result dict to the parent (one marked line on stdout)."""
    sys.stdout.write(_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(args: Sequence[str], threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Parent side: run `python ARGS` in a fresh process, return the dict it reported.

    A worker that crashes or reports nothing gives {"error": ...} rather than killing the whole run.
    """
    cmd = [sys.executable, *args]
    try:
        p = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True, timeout=timeout,
                           cwd=REPO_ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in p.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {p.returncode}: " + " | ".join(tail)}


# ---- serving clients -------------------------------------------------------------------------------
async def stream_chat(ac: Any, text: str, max_tokens: int, *, model: str | None = None,
                      on_first: Callable[[], Any] | None = None, count_tokens: bool = False) -> dict[str, Any]:
    """One greedy streamed chat/completions request on `ac` (an httpx.AsyncClient), its `data:` chunks read as they
    arrive: what the serving benchmarks measure a request by, parsed one way for all of them.

    Returns sent / end (perf_counter), latency_s, ttft_s (sent -> first content chunk; the end when none came),
    times (arrival of each content chunk), text, completion_tokens (from `usage`, else the content pieces: see
    tokens_from), usage ({} when none came) and finish_reason; or {"error": ...} for a non-200 answer or an error
    chunk. `model` names the model or adapter (None: the server's default); on_first runs at the first content.
    count_tokens: ask for logprobs (no alternatives) and return `ntok`, the tokens each content chunk carries (a
    character split over two tokens comes in one chunk with both).
    Transport errors are raised: the caller decides whether to retry.
    """
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    if count_tokens:
        body.update(logprobs=True, top_logprobs=0)
    ntok: list[int] = []
    sent = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    usage, finish = None, None
    async with ac.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": str(obj["error"])[:200]}
            usage = obj.get("usage") or usage
            got, k = [], 0
            for ch in obj.get("choices") or []:
                finish = ch.get("finish_reason") or finish
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    got.append(piece)
                    k += len((ch.get("logprobs") or {}).get("content") or [])
            if got:
                times.append(time.perf_counter())
                ntok.append(k)
                pieces += got
                if on_first is not None and len(times) == 1:
                    on_first()
    end = time.perf_counter()
    n = (usage or {}).get("completion_tokens")
    return {"sent": sent, "end": end, "latency_s": end - sent, "ttft_s": (times[0] if times else end) - sent,
            "times": times, "text": "".join(pieces), "completion_tokens": n if n is not None else len(pieces),
            "tokens_from": "usage" if n is not None else "chunks", "usage": usage or {}, "finish_reason": finish,
            **({"ntok": ntok} if count_tokens else {})}


# ---- output ----------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub-markdown table (prints fine in a terminal too); columns = [(key, header)]."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
        return str(v)

    body = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(heads), sep, *(line(b) for b in body)])


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (tmp + rename), so an interrupted run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers across machines: CPU, cores, flags, memory, versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "load_average": load_average()}
    from lmforge.device import cpu_identity

    info.update(cpu_identity())  # model name, family / model numbers (one name covers CPUs 2.4x apart), SIMD
    try:
        mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal"))
        info["mem_gb"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "transformers", "lmforge"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):  # not installed: leave it out
            continue
    return info


def matmul_peak(dtype: Any, seconds: float = 1.0) -> float:
    """The best CPU matmul FLOP/s in `dtype`: 2048^3, but bf16 at 512^3 where the CPU has no native bf16 (emulated
    at ~0.2 GFLOP/s, a 2048^3 one takes ~90 s; the small one says as much in under a second)."""
    import torch

    from lmforge.flops import measure_matmul_flops
    from lmforge.train.precision import cpu_has_native_bf16

    if dtype is torch.bfloat16 and cpu_has_native_bf16() is None:
        return measure_matmul_flops("cpu", dtype, size=512, seconds=0.0)
    return measure_matmul_flops("cpu", dtype, seconds=seconds)


def measured_peaks(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """This machine's own ceilings at `threads` threads, measured now (quoted beside every result): the best
    2048^3 matmul in float32 and bfloat16 (GFLOP/s; 512^3 for bf16 where the CPU emulates it) and the best copy
    of a 256 MiB tensor (GB/s, bytes read + written). Run it in a worker or before any timed work: it sets
    torch's thread count."""
    import torch

    set_threads(threads)
    out = {f"matmul_{n}_gflops": round(matmul_peak(dt, seconds) / 1e9, 1)
           for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    src = torch.ones(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = min(time_fn(lambda: dst.copy_(src), iters=5, warmup=1))
    out["copy_gb_s"] = round(2 * src.numel() * 4 / best / 1e9, 1)
    out["threads"] = threads
    return out
