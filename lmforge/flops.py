"""Model FLOPs per token, a measured matmul peak, and model FLOPs utilisation (MFU).

Model FLOPs follow the PaLM convention (Chowdhery et al. 2022, appendix B): a training token costs
6 * N + 12 * L * H * hd * T, where N counts the weights of every matmul a token goes through (attention
and MLP projections and the LM head; not the embedding lookups, norms or biases) and the second term is
the attention scores and the weighted sum over a context of T (counted in full, as PaLM does, although a
causal mask needs only half). Recomputation is not counted: MFU says how much of the hardware's matmul
peak goes into the model's own arithmetic.

The peak is measured, not taken from a data sheet: a few large square matmuls in the training dtype on
the training device, with the threads this process uses. It is cached per (device, dtype, threads) in
$LMFORGE_CACHE/peak_flops.json (default ~/.cache/lmforge) so a run measures it once; a re-measurement
(remeasure=True, or a later run when the cached one was measured on a busy CPU) keeps the higher value,
since other processes on the machine can only slow it down.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.io import atomic_write, cache_root

PEAK_FILE = "peak_flops.json"


# ---- model FLOPs -----------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
    """Weights of the matmuls one token goes through: q, k, v, o, the MLP and the LM head."""
    assert cfg.head_dim is not None and cfg.n_kv_heads is not None
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q and o, k and v
    mlp = (2 if cfg.mlp == "gelu" else 3) * d * cfg.d_ff
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs of one token at context `seq_len`: 6N + 12*L*H*hd*T to train, 2N + 4*L*H*hd*T forward."""
    assert cfg.head_dim is not None
    n = matmul_params(cfg)
    attn = cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float((6 * n + 12 * attn) if training else (2 * n + 4 * attn))


# ---- peak ------------------------------------------------------------------------------------------
def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device.type}|{device_name(device)}|{str(dtype).replace('torch.', '')}|threads={threads}"


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         size: int | None = None, seconds: float = 1.0) -> float:
    """Best FLOP/s of repeated (n x n) @ (n x n) matmuls; the best, not the mean, is what the chip can do."""
    dev = torch.device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    torch.mm(a, b, out=c)  # warm-up: thread pools, kernel selection
    sync()
    best, t_end, reps = 0.0, time.perf_counter() + seconds, 0
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
        reps += 1
    return best


def _machine_busy(device: torch.device) -> bool:
    """Whether other processes use the CPU now (1-minute load above half the cores): a CPU peak measured
    then is too low, so it is measured again on a later run."""
    if device.type != "cpu":
        return False
    try:
        return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    except OSError:
        return False


def peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
               cache: bool = True, remeasure: bool = False) -> float:
    """The matmul peak of this process on `device` (FLOP/s), measured once and cached.

    A cached value measured while the machine was busy is measured again (the higher value is kept)."""
    dev = torch.device(device)
    key = _peak_key(dev, dtype)
    path = cache_root() / PEAK_FILE
    table: dict[str, dict] = {}
    if cache and path.is_file():
        try:
            # an entry from an older version (a bare number) may come from a busy machine: measured again
            table = {k: (v if isinstance(v, dict) else {"flops": float(v), "busy": True})
                     for k, v in json.loads(path.read_text()).items()}
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            table = {}
    old = table.get(key)
    if not remeasure and old is not None and not old.get("busy"):
        return float(old["flops"])
    busy = _machine_busy(dev)
    value = measure_matmul_flops(dev, dtype)
    if old is not None:  # a peak is a maximum: a slowed-down measurement never lowers it
        value = max(value, float(old["flops"]))
        busy = busy and bool(old.get("busy"))
    if cache:
        table[key] = {"flops": value, "busy": busy}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(table, indent=1) + "\n")
        except OSError:  # a read-only home still gets a measured peak, just not a cached one
            pass
    return value


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """Achieved model FLOP/s over the peak, a fraction (0.5 = 50%)."""
    if peak <= 0:
        raise ConfigError(f"peak FLOP/s must be > 0, got {peak}")
    return tokens_per_s * flops_token / peak
