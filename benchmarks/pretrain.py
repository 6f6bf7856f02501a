"""Pretraining throughput and MFU: lmforge vs transformers' GPT2LMHeadModel, same config, optimizer and batch.

    python benchmarks/pretrain.py [--batch 4] [--seq 256] [--steps 4] [--warmup 2] [--threads 2]
                                  [--rounds 2] [--dropout 0.0] [--impls lmforge,transformers]
                                  [--out benchmarks/results/pretrain.json]

A GPT-2-small-shaped model (124M: 12 layers, width 768, 12 heads, vocabulary 50257, 1024 positions) is
trained from the same random init recipe on random token ids, batch B x T. One step = forward, next-token
cross-entropy over all B*T targets, backward, gradient clipping at 1.0, AdamW (lr 3e-4, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on matrices only, the fused kernel when available), zero_grad: what the Trainer
does per step. Dropout is the same on both sides (0.0 by default, as `lmforge pretrain`).

Implementations, each in its own fresh subprocess, rounds alternating who goes first:
  lmforge             lmforge.tasks.pretrain.CausalLM over our Transformer (eager), with the CPU allocator
                      tuning `lmforge pretrain` applies (tune_cpu_allocator: no mmap/trim in glibc malloc)
  lmforge-compile     the same under torch.compile (what `--compile` does)
  lmforge-plain-loss  lmforge without the fused LM-head loss (logits -> F.cross_entropy) nor allocator tuning
  transformers        GPT2LMHeadModel (attn_implementation="sdpa"), labels= loss (eager), default allocator
  transformers-malloc the same with lmforge's allocator tuning, to show what that part is worth to either

The matmul peak (FLOP/s of a 2048^3 float32 matmul, best of ~2 s) is measured in its own worker with the
same threads, in every round; the best is used. Each implementation's step time is the median of its
timed steps in its least disturbed round (the machine is shared: other jobs only ever slow a run down);
every step of every round is in the JSON. MFU = tokens/s * model FLOPs per token / peak, with model FLOPs =
6N + 12*L*H*hd*T (lmforge.flops; N = matmul weights incl. the LM head).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, format_table, machine_info, report, run_worker, set_threads, write_json

IMPLS = ("lmforge", "transformers")
ALL_IMPLS = ("lmforge", "lmforge-compile", "lmforge-plain-loss", "transformers", "transformers-malloc")
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1


def _config(dropout: float):
    from lmforge.config import preset

    return preset("gpt2-small", dropout=dropout)


def _optimizer(groups):
    import torch

    for extra in ({"fused": True}, {"foreach": True}):
        try:
            return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, **extra)
        except (RuntimeError, ValueError, TypeError):
            continue
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)


# ---- workers ---------------------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import torch

    set_threads(a.threads)
    if a.impl == "peak":
        from lmforge.flops import measure_matmul_flops

        report({"impl": "peak", "peak_flops": measure_matmul_flops("cpu", torch.float32, seconds=a.peak_seconds),
                "torch_threads": torch.get_num_threads()})
        return
    torch.manual_seed(0)
    cfg = _config(a.dropout)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (a.steps + a.warmup, a.batch, a.seq + 1), generator=g)
    res: dict = {"impl": a.impl}
    if a.impl in ("lmforge", "lmforge-compile", "transformers-malloc"):
        from lmforge.tasks.pretrain import tune_cpu_allocator

        res["malloc_tuned"] = tune_cpu_allocator()
    if a.impl.startswith("lmforge"):
        from lmforge.model.heads import CausalLM
        from lmforge.model.transformer import Transformer
        from lmforge.train.optim import param_groups

        backbone = Transformer(cfg)
        backbone.reset_parameters()
        model = CausalLM(backbone, fused_loss=a.impl != "lmforge-plain-loss").train()
        opt = _optimizer(param_groups(model, WD))
        fwd = torch.compile(model) if a.impl.endswith("compile") else model

        def loss_of(x):
            return fwd(x[:, :-1], x[:, 1:])
    else:
        import transformers

        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu_new", resid_pdrop=a.dropout,
            embd_pdrop=a.dropout, attn_pdrop=a.dropout, layer_norm_epsilon=cfg.norm_eps)
        model = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").train()
        res["attn_implementation"] = model.config._attn_implementation
        from lmforge.train.optim import param_groups

        opt = _optimizer(param_groups(model, WD))

        def loss_of(x):
            # the same T input tokens; HF shifts labels inside, so it scores T-1 of them (one row fewer of CE)
            return model(input_ids=x[:, :-1], labels=x[:, :-1], use_cache=False).loss

    res["parameters"] = sum(p.numel() for p in model.parameters())
    params = [p for grp in opt.param_groups for p in grp["params"]]
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        x = data[i]
        t0 = time.perf_counter()
        loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= a.warmup:
            times.append(dt)
    res.update(step_s=statistics.median(times), times=times, losses=losses, torch_threads=torch.get_num_threads(),
               optimizer=type(opt).__name__ + (" fused" if opt.defaults.get("fused") else " foreach"))
    report(res)


# ---- parent ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(ALL_IMPLS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per worker (median quoted)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (allocations, compile)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument("--out", default=str(RESULTS_DIR / "pretrain.json"))
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0

    impls = [s.strip() for s in a.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in ALL_IMPLS]
    if bad:
        p.error(f"--impls: unknown {bad} (known: {', '.join(ALL_IMPLS)})")
    from lmforge.flops import flops_per_token

    fpt = flops_per_token(_config(a.dropout), a.seq)
    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--threads", str(a.threads), "--dropout", str(a.dropout), "--peak-seconds", str(a.peak_seconds)]
    me = str(Path(__file__).resolve())
    runs: dict[str, list[dict]] = {i: [] for i in ["peak", *impls]}
    for r in range(a.rounds):
        order = ["peak", *(impls if r % 2 == 0 else impls[::-1])]
        for impl in order:
            print(f"  {impl} (round {r + 1}/{a.rounds}) ...", file=sys.stderr, flush=True)
            res = run_worker([me, "--worker", "--impl", impl, *common], threads=a.threads, timeout=3600)
            if "error" in res:
                print(f"    {impl} failed: {res['error']}", file=sys.stderr)
            runs[impl].append(res)
    peaks = [r["peak_flops"] for r in runs["peak"] if "peak_flops" in r]
    peak = max(peaks) if peaks else float("nan")
    tokens = a.batch * a.seq
    rows = []
    for impl in impls:
        ok = [r for r in runs[impl] if "step_s" in r]
        if not ok:
            rows.append({"impl": impl, "error": runs[impl][-1].get("error")})
            continue
        # other jobs on the machine can only slow a worker down: quote the least disturbed round
        step = min(statistics.median(r["times"]) for r in ok)
        tps = tokens / step
        rows.append({"impl": impl, "step_s": step, "tokens_per_s": tps, "gflops": tps * fpt / 1e9,
                     "mfu": tps * fpt / peak, "parameters": ok[0]["parameters"], "optimizer": ok[0]["optimizer"],
                     "first_loss": ok[0]["losses"][0], "runs": ok})
    ref = next((r for r in rows if r["impl"] == "transformers" and "tokens_per_s" in r), None)
    for r in rows:
        if ref and "tokens_per_s" in r:
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
    table = format_table([{**r, "mfu_pct": 100 * r["mfu"] if "mfu" in r else None} for r in rows],
                         [("impl", "implementation"), ("step_s", "step s"), ("tokens_per_s", "tokens/s"),
                          ("gflops", "GFLOP/s"), ("mfu_pct", "MFU %"), ("speedup", "vs transformers")])
    print(f"GPT-2 small shape ({rows[0].get('parameters', 0) / 1e6:.1f}M params), batch {a.batch} x {a.seq}, "
          f"dropout {a.dropout}, {a.threads} threads; {fpt / 1e6:.0f} MFLOP/token; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (best of {len(peaks)})\n")
    print(table)
    payload = {"benchmark": "pretrain", "batch": a.batch, "seq": a.seq, "dropout": a.dropout, "threads": a.threads,
               "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "flops_per_token": fpt,
               "peak_flops": peak, "peak_runs": peaks, "results": rows, "machine": machine_info(),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\nwrote {write_json(a.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
