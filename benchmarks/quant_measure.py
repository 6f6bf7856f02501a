"""Decode speed and perplexity of float32 vs weight-only quantized variants (the table in docs/quantization.md).

    python benchmarks/quant_measure.py [--model smollm2-135m-instruct] [--speed] [--text FILE] [--threads 1]
                                       [--variants float32,int8,int8+head,int4+int8head,int4+head]

Speed is batch-1 greedy decoding (`decode_tokens_per_s`); perplexity runs lmforge.metrics.perplexity over
consecutive blocks of the text, once per QuantLinear path (`--paths kernel,dequant`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from lmforge.checkpoints import load
from lmforge.decoding import greedy
from lmforge.metrics import perplexity
from lmforge.quant import QuantError, kernel_mode, quantize_model, quantized_nbytes

VARIANTS = {  # name -> quantize_model arguments (None = float32 as loaded)
    "float32": None,
    "int8": dict(bits=8),
    "int8+head": dict(bits=8, skip=()),
    "int4+head": dict(bits=4, group_size=32, skip=()),
    "int4+int8head": dict(bits=4, group_size=32, skip=(), head_bits=8),
}


def decode_tokens_per_s(model: nn.Module, prompt_len: int = 30, new_tokens: int = 128, repeats: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """Batch-1 greedy decoding speed: new tokens / wall time of generate.greedy (prefill included).
    `cpu`: new tokens / CPU time of this process: with one thread, what the wall rate would be on an
    otherwise idle machine (our shared 2-core box is rarely idle)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=g)  # (1, prompt_len)
    greedy(model, prompt, 8)  # warm-up: kernel operands, allocator
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        greedy(model, prompt, new_tokens)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median": new_tokens / statistics.median(times), "best": new_tokens / min(times),
            "cpu": new_tokens / statistics.median(cpu)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/quant_measure.py",
                                 description="Decode speed and perplexity of float32 vs quantized variants.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", default="float32,int8,int8+head,int4+int8head,int4+head",
                    help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--text", help="text file for perplexity (skipped if absent)")
    ap.add_argument("--start", default="Chapter 1", help="perplexity text starts at this string")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--paths", default="kernel,dequant", help="QuantLinear paths to score perplexity on")
    ap.add_argument("--speed", action="store_true", help="measure batch-1 greedy tokens/s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            raise QuantError(f"--variants: unknown variant {name!r}: one of {sorted(VARIANTS)}")
    base, tok = load(a.model)
    ids = None
    if a.text:
        text = Path(a.text).read_text(encoding="utf-8")
        text = text[max(0, text.find(a.start)):]
        ids = torch.tensor(tok.encode(text, add_special_tokens=False)[: a.tokens])
    print(f"model {a.model}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    print("| variant | matmul weights read per token (MiB) | tokens/s wall, median (best) | tokens/CPU-s | "
          + " | ".join(f"ppl ({p})" for p in a.paths.split(",")) + " |", flush=True)
    for name in names:
        kw = VARIANTS[name]
        m = base if kw is None else quantize_model(copy.deepcopy(base), **kw)
        nb = quantized_nbytes(m)
        row = [name, f"{(nb['quantized'] + nb['float']) / 2**20:.0f}"]
        if a.speed:
            s = decode_tokens_per_s(m, repeats=a.repeats)
            row += [f"{s['median']:.1f} ({s['best']:.1f})", f"{s['cpu']:.1f}"]
        else:
            row += ["-", "-"]
        for i, p in enumerate(a.paths.split(",")):
            if ids is None or (kw is None and i > 0):  # float32 has one path
                row.append("-" if ids is None else row[-1])
                continue
            t0 = time.perf_counter()
            with kernel_mode(m, p if kw is not None else "auto"):
                row.append(f"{perplexity(m, ids, block=a.block):.4f}")
            print(f"  ({name} ppl {p}: {time.perf_counter() - t0:.0f} s)", flush=True)
        print("| " + " | ".join(row) + " |", flush=True)
        if kw is not None:
            del m


if __name__ == "__main__":
    main()
