"""lmforge against transformers on a GPU: forward, greedy decoding and a bf16 training step, on the shapes of
the models the CPU tables use (minilm-l6, SmolLM2-135M), beside the GPU's own measured peaks.

The weights are random (seeded) and written once with transformers' save_pretrained; both libraries load that
directory. Speed does not depend on the weights' values, and a GPU machine here has no copy of the real files
(they are larger than what travels to it). Each side's output is compared (max |difference|), so both do the
same work.

    python benchmarks/cuda_bench.py                       # on a CUDA GPU: a few minutes
    python benchmarks/cuda_bench.py --device cpu --small   # a smoke run of the script itself (CI-sized)

Timing: CUDA events are not needed: every timed call ends with torch.cuda.synchronize(), then the median of the
timed calls after warm-ups. The training step is a plain loop on both sides (forward, next-token loss, backward,
AdamW) under bf16 autocast with float32 weights, what `--precision auto` trains in on a bf16 GPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, machine_info, write_json  # noqa: E402


def shapes(small: bool) -> dict[str, Any]:
    import transformers

    layers = (2, 2) if small else (6, 30)
    vocab = (1000, 1000) if small else (30522, 49152)
    return {
        "minilm-l6": transformers.BertConfig(vocab_size=vocab[0], hidden_size=384, num_hidden_layers=layers[0],
                                             num_attention_heads=12, intermediate_size=1536,
                                             max_position_embeddings=512),
        "smollm2-135m": transformers.LlamaConfig(
            vocab_size=vocab[1], hidden_size=576, num_hidden_layers=layers[1], num_attention_heads=9,
            num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048, rope_theta=100000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    }


def write_models(root: Path, small: bool) -> dict[str, Path]:
    import transformers

    out = {}
    for name, cfg in shapes(small).items():
        torch.manual_seed(0)
        cls = transformers.BertModel if name.startswith("minilm") else transformers.LlamaForCausalLM
        d = root / name
        cls(cfg).save_pretrained(d)
        out[name] = d
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_mb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def device_peaks(dev: torch.device, small: bool) -> dict[str, Any]:
    """This device's ceilings, measured now: bf16 and true-float32 matmul TFLOP/s, copy GB/s (read + write)."""
    from lmforge.flops import device_name, measure_matmul_flops

    size = 256 if small else None  # bf16 is emulated (slow) on most CPUs: --small only checks the script
    out: dict[str, Any] = {"device": device_name(dev)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[f"matmul_{name}_tflops"] = round(measure_matmul_flops(dev, dt, size=size, seconds=0.5) / 1e12, 2)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    n = (16 if small else 512) * 2**20  # floats: 64 MiB or 2 GiB
    src = torch.ones(n, device=dev)
    dst = torch.empty_like(src)
    out["copy_gb_s"] = round(2 * n * 4 / timed(functools.partial(dst.copy_, src), dev, 5) / 1e9, 1)
    return out


# ---- the three workloads ---------------------------------------------------------------------------------
def _forward(m: torch.nn.Module, impl: str, encoder: bool, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states (encoder) or logits (decoder), (B, T, D or V)."""
    if impl == "lmforge":
        return m(ids, mask) if encoder else m.logits(ids, mask)
    out = m(ids, attention_mask=mask)
    return out.last_hidden_state if encoder else out.logits


def _greedy(impl: str, ours, hf, ids: torch.Tensor, new: int, opts, runtime=None) -> torch.Tensor:
    """(B, new) greedy tokens, never stopping early. runtime: lmforge's DecodeRuntime, kept across calls so the
    compiled step is made once."""
    from lmforge.decoding import GenerationConfig, stream_tokens

    with torch.inference_mode():
        if impl == "transformers":
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=2)
            return out[:, ids.shape[1]:]
        gc = GenerationConfig(max_new_tokens=new, stop_token_ids=[])
        return torch.stack([t for t, _ in stream_tokens(ours, ids, None, gc, opts, runtime)], 1)


def bench_forward(dirs: dict[str, Path], dev: torch.device, dtype: torch.dtype, iters: int) -> list[dict]:
    import transformers

    from lmforge.checkpoints import load_checkpoint

    rows = []
    for name, (B, T) in (("minilm-l6", (32, 128)), ("smollm2-135m", (8, 256))):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 1000, (B, T), generator=g).to(dev)
        mask = torch.ones_like(ids)
        encoder = name.startswith("minilm")
        auto = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
        outs = {}
        for impl in ("lmforge", "transformers"):
            reset_peak(dev)
            if impl == "lmforge":
                m = load_checkpoint(dirs[name], dtype=dtype, device=dev, tokenizer=False).model.eval()
            else:
                m = auto.from_pretrained(dirs[name], dtype=dtype).to(dev).eval()
            fn = functools.partial(_forward, m, impl, encoder, ids, mask)
            with torch.inference_mode():
                s = timed(fn, dev, iters)
                outs[impl] = fn().float()
            rows.append({"workload": f"forward {name} {B}x{T}", "impl": impl, "ms": round(s * 1e3, 2),
                         "tokens_s": round(B * T / s), "peak_mb": peak_mb(dev)})
            del m
        diff = float((outs["lmforge"] - outs["transformers"]).abs().max())
        for r in rows[-2:]:
            r["max_diff"] = f"{diff:.2e}"
    return rows


def bench_generate(d: Path, dev: torch.device, dtype: torch.dtype, new: int, batches: list[int],
                   compiled: bool = True) -> list[dict]:
    import transformers

    from lmforge.checkpoints import load_checkpoint
    from lmforge.decoding import DecodeOptions, DecodeRuntime, compiler_missing

    ours = load_checkpoint(d, dtype=dtype, device=dev, tokenizer=False).model.eval()
    runtime = DecodeRuntime(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
    rows = []
    impls = ["lmforge eager", *(["lmforge compiled"] if compiled else []), "transformers"]
    for B in batches:
        ids = torch.randint(3, 1000, (B, 30), generator=torch.Generator().manual_seed(B)).to(dev)
        toks: dict[str, torch.Tensor] = {}
        for impl in impls:
            if impl == "lmforge compiled" and (why := compiler_missing(dev)):
                rows.append({"workload": f"generate B={B}", "impl": impl, "note": f"skipped: {why}"})
                continue
            opts = DecodeOptions("on" if impl == "lmforge compiled" else "off")
            run = functools.partial(_greedy, impl, ours, hf, ids, new, opts, runtime)
            s = timed(run, dev, iters=3, warmup=2 if impl == "lmforge compiled" else 1)
            toks[impl] = run()
            rows.append({"workload": f"generate B={B}, 30+{new}", "impl": impl, "ms": round(s * 1e3, 1),
                         "tokens_s": round(B * new / s, 1), "note": opts.path if impl != "transformers" else ""})
        ref = toks.get("transformers")
        for r in rows:
            if r["workload"].startswith(f"generate B={B},") and r["impl"] in toks and ref is not None:
                r["same_tokens"] = f"{float((toks[r['impl']] == ref).float().mean()):.3f}"
    return rows


def bench_train(d: Path, dev: torch.device, B: int, T: int, iters: int, peak_bf16: float) -> list[dict]:
    """One training step (forward, loss, backward, AdamW) of the SmolLM2 shape under bf16 autocast."""
    import torch.nn.functional as F
    import transformers

    from lmforge.checkpoints import load_checkpoint
    from lmforge.flops import flops_per_token
    from lmforge.model.heads import CausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (B, T + 1), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    rows, losses = [], {}
    cfg = None
    for impl in ("lmforge", "transformers"):
        reset_peak(dev)
        if impl == "lmforge":
            backbone = load_checkpoint(d, device=dev, tokenizer=False).model
            cfg = backbone.cfg
            model: torch.nn.Module = CausalLM(backbone)

            def loss_fn(model=model) -> torch.Tensor:
                return model(x, y)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(dev)

            def loss_fn(model=model) -> torch.Tensor:
                logits = model(x).logits  # (B, T, V)
                return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
        seen: list[float] = []

        def step(loss_fn=loss_fn, opt=opt, seen=seen) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen.append(loss.detach())

        s = timed(step, dev, iters)
        losses[impl] = [round(float(v), 4) for v in seen[:1] + seen[-1:]]
        tps = B * T / s
        assert cfg is not None
        rows.append({"workload": f"train step smollm2-135m {B}x{T}, bf16 autocast", "impl": impl,
                     "ms": round(s * 1e3, 1), "tokens_s": round(tps),
                     "mfu_pct": round(100 * tps * flops_per_token(cfg, T) / peak_bf16, 1) if peak_bf16 else None,
                     "peak_mb": peak_mb(dev), "note": f"loss first/last {losses[impl]}"})
        del model, opt
    return rows


COLUMNS = [("workload", "workload"), ("impl", "impl"), ("ms", "ms"), ("tokens_s", "tokens/s"),
           ("x_transformers", "x transformers"), ("mfu_pct", "MFU %"), ("peak_mb", "peak MB"),
           ("max_diff", "max diff"), ("same_tokens", "same tokens"), ("note", "note")]


def report(rows: list[dict], info: dict[str, Any], a: argparse.Namespace) -> Path:
    """Add each row's ratio to transformers on the same workload, and write the JSON so far."""
    by_work: dict[str, dict[str, float]] = {}
    for r in rows:
        if "tokens_s" in r:
            by_work.setdefault(r["workload"], {})[r["impl"]] = r["tokens_s"]
    for r in rows:
        ref = by_work.get(r["workload"], {}).get("transformers")
        if ref and "tokens_s" in r:
            r["x_transformers"] = round(r["tokens_s"] / ref, 2)
    return write_json(a.out, {"machine": info, "settings": vars(a), "rows": rows})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="2-layer models, small sizes: checks the script, not speed")
    p.add_argument("--parts", default="forward,generate,train", help="comma list of forward, generate, train")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 128; 8 --small)")
    p.add_argument("--batches", default=None, help="generation batch sizes (default 1,8; 1,2 with --small)")
    p.add_argument("--train-batch", default=None, help="BxT of the training step (default 8x512; 2x32 --small)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled decode step (it compiles)")
    p.add_argument("--out", default=str(RESULTS_DIR / "cuda.json"))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu --small to check the script)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    new = a.new_tokens or (8 if a.small else 128)
    batches = [int(b) for b in (a.batches or ("1,2" if a.small else "1,8")).split(",")]
    B, T = (int(v) for v in (a.train_batch or ("2x32" if a.small else "8x512")).split("x"))
    parts = set(a.parts.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    info = {**machine_info(), **device_peaks(dev, a.small), "inference_dtype": str(dtype).replace("torch.", "")}
    print(f"device: {info['device']}; matmul fp32 {info['matmul_fp32_tflops']} TFLOP/s, bf16 "
          f"{info['matmul_bf16_tflops']} TFLOP/s; copy {info['copy_gb_s']} GB/s", flush=True)
    rows: list[dict] = []
    path = report(rows, info, a)  # the peaks are kept even if the run is cut before its first part ends
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_models(Path(tmp), a.small)
        # the quick parts first, and the results written after each part: a run cut short by its time limit
        # keeps what it measured (generation compiles the decode step, which takes the longest)
        for part in ("forward", "train", "generate"):
            if part not in parts:
                continue
            if part == "forward":
                got = bench_forward(dirs, dev, dtype, iters=5 if a.small else 20)
            elif part == "train":
                got = bench_train(dirs["smollm2-135m"], dev, B, T, 3 if a.small else 10,
                                  info["matmul_bf16_tflops"] * 1e12)
            else:
                got = bench_generate(dirs["smollm2-135m"], dev, dtype, new, batches, not a.no_compile)
            rows += got
            report(rows, info, a)
            print(format_table(got, COLUMNS), flush=True)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
