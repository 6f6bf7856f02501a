"""`lmforge tokenizer train` and `lmforge pretrain`: flags -> lmforge.tasks.pretrain.

Under torchrun: `torchrun --nproc-per-node 2 -m lmforge.cli pretrain --data corpus/ --model-config gpt2-tiny`.
"""

from __future__ import annotations

import argparse

from lmforge.cli.common import (
    add_fields,
    add_train_flags,
    check_keep_best,
    check_output,
    load_resume,
    non_negative_int,
    pick,
    positive_float,
    positive_int,
    prepare_run,
    run_dir,
    train_config,
)
from lmforge.errors import LmforgeError

PRETRAIN_HELP = """Pretrain a causal LM on raw text files (UTF-8). The corpus is tokenized once into a cached
memory-mapped token file; a tokenizer is trained on the data unless --tokenizer or --init-from gives one.
Launch under torchrun for several processes (DDP, or --fsdp to shard the model)."""

DATA_FLAGS: dict[str, dict] = {
    "data": dict(default=None, metavar="FILE|DIR", help="UTF-8 text files or directories (required)"),
    "val_data": dict(metavar="FILE|DIR", help="held-out validation files (left out of --data when they are in it)"),
    "val_fraction": dict(type=positive_float, help="without --val-data: the last fraction of every file is held "
                         "out"),
    "model_config": dict(default=None, help="gpt2-tiny (default) | gpt2-small | llama-tiny | a JSON config file"),
    "init_from": dict(metavar="MODEL", help="continue pretraining this model (its config and tokenizer)"),
    "tokenizer": dict(metavar="DIR|MODEL", help="tokenizer to use (default: train a BPE tokenizer on the data)"),
    "vocab_size": dict(type=positive_int, help="model vocabulary / size of the trained tokenizer"),
    "context_length": dict(type=positive_int, help="tokens per training block (default: the config's maximum, "
                           "at most 1024)"),
    "dropout": dict(type=float, help="dropout probability (default: the config's)"),
    "min_frequency": dict(type=positive_int, help="BPE training: minimum pair count"),
    "cache_dir": dict(help="token cache root (default: ~/.cache/lmforge/tokens)"),
}
EVAL_FLAGS: dict[str, dict] = {
    "eval_tokens": dict(type=non_negative_int, help="validation tokens scored per evaluation (0 = all)"),
    "samples": dict(type=non_negative_int, help="sampled continuations printed at each evaluation"),
    "sample_tokens": dict(type=positive_int, help="tokens per sampled continuation"),
    "peak_flops": dict(type=positive_float, metavar="FLOP/S",
                       help="per-device peak for MFU (default: measured with a matmul, cached)"),
}
DIST_FLAGS: dict[str, dict] = {
    "fsdp": dict(help="shard parameters, gradients and optimizer state over the torchrun processes (FSDP)"),
}
TRAIN_DEFAULTS = {"epochs": 1.0, "batch_size": 16, "lr": None, "warmup": 0.02, "eval_every": 200,
                  "save_every": 200, "keep_best": None, "schedule": "cosine", "weight_decay": 0.1}
TRAIN_HELPS = {"lr": "peak learning rate (default: 1e-3; 3e-4 with --init-from)"}


# ---- tokenizer train ----------------------------------------------------------------------------------------
def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from lmforge.data.tokens import expand_files
    from lmforge.tasks.pretrain import train_tokenizer

    out_dir = check_output(a.output)
    files = expand_files(a.data)
    t0 = time.perf_counter()
    tok = train_tokenizer(files, a.vocab_size, a.special_tokens, a.min_frequency)
    out = tok.save(Path(out_dir))
    dt = time.perf_counter() - t0
    with open(files[0], encoding="utf-8") as f:
        sample = f.read(200_000)
    n = len(tok.encode(sample, add_special_tokens=False))
    rate = len(sample.encode("utf-8")) / max(n, 1)
    print(f"tokenizer: {tok.vocab_size} tokens (byte-level BPE) trained on {len(files)} file(s) in {dt:.1f}s -> "
          f"{out}/tokenizer.json; {rate:.2f} bytes per token on {files[0].name}")
    return 0


# ---- pretrain ---------------------------------------------------------------------------------------------
def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmforge.tasks.pretrain import CONFIG_FILE, EVAL_METRICS, PretrainConfig, pretrain, tune_cpu_allocator
    from lmforge.train.strategy import init_distributed

    check_keep_best(a.keep_best, EVAL_METRICS, "pretrain")
    info = init_distributed(a.device)
    if a.resume:
        task, tc = load_resume(a, CONFIG_FILE)
        c = PretrainConfig.from_dict(task)
    else:
        if not a.data:
            raise LmforgeError("pretrain: --data FILES|DIR is required (UTF-8 text)")
        if a.init_from and a.model_config:
            raise LmforgeError("pretrain: give --model-config (train from scratch) or --init-from (continue a "
                               "pretrained model), not both")
        c = PretrainConfig(**pick(a, DATA_FLAGS), **pick(a, EVAL_FLAGS), **pick(a, DIST_FLAGS))
        c.model_config = None if a.init_from else (a.model_config or "gpt2-tiny")
        out = run_dir(a, "pretrain", a.init_from or c.model_config or "model")
        prepare_run(a, out)
        tc = train_config(a, out, {"lr": 3e-4 if a.init_from else 1e-3})
        tc.adam_betas = (0.9, 0.95)  # the usual pretraining betas: a faster second-moment estimate
        tc.min_lr_ratio = 0.1
    if a.no_plot:
        tc.plot = False
    if a.peak_flops is not None:
        c.peak_flops = a.peak_flops
    if tc.resolved_device().type == "cpu":
        tune_cpu_allocator()  # no page faults on the big per-step tensors (see its docstring)
    s = pretrain(c, tc, resume=bool(a.resume))
    if info.is_main:
        v = s["validation"]
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-"
        tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"
        print(f"run: {s['run_dir']}  steps: {s['steps']} ({s['stopped']}, {s['elapsed_s']}s, "
              f"{s['tokens_seen']:,} tokens)  validation loss {v.get('val_loss', float('nan')):.4f} "
              f"perplexity {v.get('perplexity', float('nan')):.2f}  {tps} tokens/s  MFU {mfu}")
    return 0


# ---- parser -----------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.tasks.pretrain import PretrainConfig

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = tsub.add_parser("train", help="train a byte-level BPE tokenizer (tokenizer.json + configs)",
                        description="Train a GPT-2 style byte-level BPE tokenizer on UTF-8 text files; the "
                        "output directory loads in lmforge and in transformers (PreTrainedTokenizerFast).")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE|DIR", help="text files or directories")
    s.add_argument("--vocab-size", type=positive_int, required=True, help="tokens, special ones included (>= 257)")
    s.add_argument("--output", "-o", required=True, metavar="DIR", help="directory for tokenizer.json + configs")
    s.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens, given the first ids (the first is also BOS/EOS)")
    s.add_argument("--min-frequency", type=positive_int, default=2, help="merge only pairs seen this often")
    s.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("pretrain", help="pretrain a causal LM on raw text (tokenizer, token cache, torchrun)",
                       description=PRETRAIN_HELP)
    add_fields(s.add_argument_group("data and model"), PretrainConfig, DATA_FLAGS)
    g = s.add_argument_group("evaluation")
    add_fields(g, PretrainConfig, EVAL_FLAGS)
    g.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    add_fields(s.add_argument_group("distributed"), PretrainConfig, DIST_FLAGS)
    add_train_flags(s, TRAIN_DEFAULTS, TRAIN_HELPS)
    s.set_defaults(func=cmd_pretrain)
