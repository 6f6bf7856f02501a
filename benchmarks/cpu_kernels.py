"""Quantized matmul kernels, one call, side by side: lmforge's AVX2 kernels (int8 activation blocks), torch's packed
int4/int8 kernels (bf16 activations) and float32 F.linear, on SmolLM2-135M's layer shapes with random weights.

    python benchmarks/cpu_kernels.py [--threads 2] [--rows 1] [--out benchmarks/results/cpu_kernels.json]

  hot_us     one layer called repeatedly (its weights stay in cache), median of 5 rounds, microseconds
  sweep_ms   the 120 block matmuls of one SmolLM2 token, 30 distinct layers' weights (more than the L3 cache:
             streamed from memory as in decoding), median of 5 rounds, milliseconds
`--rows` is M (1 = batch-1 decoding). Needs a CPU with AVX2 and FMA and a C++ compiler for lmforge's kernels
(LMFORGE_CPU_KERNELS is set to "on" here); torch's int4 kernel needs N % 16 == 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, format_table, machine_info, measured_peaks, set_threads, write_json

SHAPES = [("q|k|v", 960, 576), ("o", 576, 576), ("gate|up", 3072, 576), ("down", 576, 1536)]
HEAD = ("head (int8)", 49152, 576)


def _median_us(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(max(2, calls // 20)):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def _int4_row(label: str, N: int, K: int, M: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lmforge.quant import pack_nibbles, quantize_int4
    from lmforge.quant.kernels import kernel_operands

    q, s, lo = quantize_int4(torch.randn(N, K), 32)
    nib = pack_nibbles(q)
    packed, sz = kernel_operands(4, 32, nib, s, lo)
    wf = (q.float().reshape(N, K // 32, 32) * s[..., None] + lo[..., None]).reshape(N, K)
    x = torch.randn(M, K)
    return {"layer": label,
            "lmforge_us": _median_us(lambda: torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], M), 200),
            "torch_us": _median_us(lambda: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz), 200),
            "float32_us": _median_us(lambda: F.linear(x, wf), 200)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (M)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "cpu_kernels.json"))
    a = ap.parse_args()
    os.environ["LMFORGE_CPU_KERNELS"] = "on"
    import torch
    import torch.nn.functional as F

    from lmforge import cpu_kernels
    from lmforge.quant import pack_nibbles, quantize_int4, quantize_int8
    from lmforge.quant.kernels import kernel_operands

    set_threads(a.threads)
    if not cpu_kernels.available():
        sys.exit(f"lmforge's AVX2 kernels are not available here: {cpu_kernels.failure()}")
    torch.manual_seed(0)
    M, rows, ops = a.rows, [], torch.ops.lmforge
    for name, N, K in SHAPES:
        rows.append(_int4_row(f"{name} {N}x{K} int4", N, K, M))
    name, N, K = HEAD
    q8, s8 = quantize_int8(torch.randn(N, K))
    s8f, s8b, w8 = s8.reshape(-1).contiguous(), s8.reshape(-1).bfloat16(), q8.float() * s8
    x8 = torch.randn(M, K)
    rows.append({"layer": f"{name} {N}x{K}",
                 "lmforge_us": _median_us(lambda: ops.q8_mm(x8, q8, s8f, M), 20),
                 "torch_us": _median_us(lambda: torch._weight_int8pack_mm(x8.bfloat16(), q8, s8b), 20),
                 "float32_us": _median_us(lambda: F.linear(x8, w8), 5)})
    # one token's block matmuls over 30 distinct layers: the weights stream from memory
    own, tor = [], []
    for _ in range(30):
        for _n, N, K in SHAPES:
            q, s, lo = quantize_int4(torch.randn(N, K), 32)
            nib = pack_nibbles(q)
            own.append((nib, s, lo, torch.randn(M, K)))
            tor.append((*kernel_operands(4, 32, nib, s, lo), own[-1][3].bfloat16()))
    sweep = {"layer": "sweep: 120 int4 matmuls, 30 layers (ms)",
             "lmforge_us": _median_us(lambda: [ops.q4_mm(x, [n], [s], [lo], M) for n, s, lo, x in own], 5) / 1e3,
             "torch_us": _median_us(lambda: [torch._weight_int4pack_mm_for_cpu(x, p, 32, sz) for p, sz, x in tor], 5)
             / 1e3}
    rows.append(sweep)
    for r in rows:
        for k in ("lmforge_us", "torch_us", "float32_us"):
            if k in r:
                r[k] = round(r[k], 1)
        if "torch_us" in r:
            r["torch_over_lmforge"] = round(r["torch_us"] / r["lmforge_us"], 2)
    cols = [("layer", "layer (N x K)"), ("lmforge_us", "lmforge AVX2 us"), ("torch_us", "torch packed, bf16 x us"),
            ("float32_us", "float32 F.linear us"), ("torch_over_lmforge", "torch / lmforge")]
    print(f"M = {M}, {a.threads} threads")
    print(format_table(rows, cols))
    machine = {**machine_info(), "peaks": measured_peaks(a.threads)}
    write_json(a.out, {"machine": machine, "rows_of_x": M, "threads": a.threads, "rows": rows})
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
