"""`lmforge tokenizer train` and `lmforge pretrain`: flags -> lmforge.tasks.pretrain.

`register(sub)` adds both verbs to the main parser (cli.py appends it to _EXTRA_VERBS); `main(argv)` runs
them on their own, e.g. `python -m lmforge.cli_pretrain pretrain ...` or under torchrun:

    torchrun --nproc-per-node 2 -m lmforge.cli_pretrain pretrain --data corpus/ --model-config gpt2-tiny
"""

from __future__ import annotations

import argparse
import sys

from lmforge.errors import LmforgeError

PRETRAIN_HELP = """Pretrain a causal LM on raw text files (UTF-8). The corpus is tokenized once into a cached
memory-mapped token file; a tokenizer is trained on the data unless --tokenizer or --init-from gives one.
Launch under torchrun for several processes (DDP, or --fsdp to shard the model)."""


# ---- tokenizer train ---------------------------------------------------------------------------------
def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from lmforge.data.tokens import expand_files
    from lmforge.tasks.pretrain import train_tokenizer

    files = expand_files(a.data)
    t0 = time.perf_counter()
    tok = train_tokenizer(files, a.vocab_size, a.special_tokens, a.min_frequency)
    out = tok.save(Path(a.output))
    dt = time.perf_counter() - t0
    with open(files[0], encoding="utf-8") as f:
        sample = f.read(200_000)
    n = len(tok.encode(sample, add_special_tokens=False))
    rate = len(sample.encode("utf-8")) / max(n, 1)
    print(f"tokenizer: {tok.vocab_size} tokens (byte-level BPE) trained on {len(files)} file(s) in {dt:.1f}s -> "
          f"{out}/tokenizer.json; {rate:.2f} bytes per token on {files[0].name}")
    return 0


# ---- pretrain ----------------------------------------------------------------------------------------
def cmd_pretrain(a: argparse.Namespace) -> int:
    from lmforge.cli import _load_resume, _run_dir, _train_config
    from lmforge.distributed import init_distributed
    from lmforge.tasks.pretrain import CONFIG_FILE, PretrainConfig, pretrain

    info = init_distributed(a.device)
    if a.resume:
        task, tc = _load_resume(a, CONFIG_FILE)
        c = PretrainConfig.from_dict(task)
    else:
        if not a.data:
            raise LmforgeError("pretrain: --data FILES|DIR is required (UTF-8 text)")
        if a.init_from and a.model_config:
            raise LmforgeError("pretrain: give --model-config (train from scratch) or --init-from (continue a "
                               "pretrained model), not both")
        c = PretrainConfig(
            data=a.data, model_config=None if a.init_from else (a.model_config or "gpt2-tiny"),
            init_from=a.init_from, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
            context_length=a.context_length, val_fraction=a.val_fraction, val_data=a.val_data,
            cache_dir=a.cache_dir, eval_tokens=a.eval_tokens, samples=a.samples, sample_tokens=a.sample_tokens,
            dropout=a.dropout, min_frequency=a.min_frequency, fsdp=a.fsdp, peak_flops=a.peak_flops)
        defaults = {"epochs": 1.0, "batch_size": 16, "lr": 3e-4 if a.init_from else 1e-3, "warmup": 0.02,
                    "eval_every": 200, "save_every": 200}
        name = a.init_from or c.model_config or "model"
        tc = _train_config(a, _run_dir(a, "pretrain", name), defaults)
        tc.adam_betas = (0.9, 0.95)  # the usual pretraining betas: a faster second-moment estimate
        tc.min_lr_ratio = 0.1
    if a.no_plot:
        tc.plot = False
    if a.peak_flops is not None:
        c.peak_flops = a.peak_flops
    from lmforge.tasks.pretrain import tune_cpu_allocator
    from lmforge.train.trainer import resolve_device

    if resolve_device(tc.device).type == "cpu":
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


# ---- parser ------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import _add_train_flags

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = tsub.add_parser("train", help="train a byte-level BPE tokenizer (tokenizer.json + configs)",
                        description="Train a GPT-2 style byte-level BPE tokenizer on UTF-8 text files; the "
                        "output directory loads in lmforge and in transformers (PreTrainedTokenizerFast).")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE|DIR", help="text files or directories")
    s.add_argument("--vocab-size", type=int, required=True, help="tokens, special ones included (>= 257)")
    s.add_argument("--output", "-o", required=True, metavar="DIR")
    s.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens, given the first ids (default: <|endoftext|>, also BOS/EOS)")
    s.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    s.set_defaults(func=cmd_tokenizer_train)

    s = sub.add_parser("pretrain", help="pretrain a causal LM on raw text (tokenizer, token cache, torchrun)",
                       description=PRETRAIN_HELP)
    g = s.add_argument_group("data and model")
    g.add_argument("--data", nargs="+", default=None, metavar="FILE|DIR", help="UTF-8 text files or directories")
    g.add_argument("--val-data", nargs="+", default=None, metavar="FILE|DIR",
                   help="held-out validation files (left out of --data when they are in it)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="without --val-data: the last fraction of every file is held out (default 0.05)")
    g.add_argument("--model-config", default=None,
                   help="gpt2-tiny (default) | gpt2-small | llama-tiny | a JSON config file")
    g.add_argument("--init-from", default=None, metavar="MODEL",
                   help="continue pretraining this model (its config and tokenizer)")
    g.add_argument("--tokenizer", default=None, metavar="DIR|MODEL",
                   help="tokenizer to use (default: train a BPE tokenizer on the data)")
    g.add_argument("--vocab-size", type=int, default=None, help="model vocabulary / size of the trained tokenizer")
    g.add_argument("--context-length", type=int, default=None,
                   help="tokens per training block (default: the config's maximum, at most 1024)")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--min-frequency", type=int, default=2, help="BPE training: minimum pair count")
    g.add_argument("--cache-dir", default=None, help="token cache root (default: ~/.cache/lmforge/tokens)")
    g = s.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=int, default=262144,
                   help="validation tokens scored per evaluation (0 = all; default 262144)")
    g.add_argument("--samples", type=int, default=2, help="sampled continuations printed at each evaluation")
    g.add_argument("--sample-tokens", type=int, default=40)
    g.add_argument("--peak-flops", type=float, default=None, metavar="FLOP/S",
                   help="per-device peak for MFU (default: measured with a matmul, cached)")
    g.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    g = s.add_argument_group("distributed")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over the torchrun processes (FSDP)")
    _add_train_flags(s)
    s.set_defaults(func=cmd_pretrain, schedule="cosine", weight_decay=0.1)


def main(argv: list[str] | None = None) -> int:
    """These two verbs on their own (the main `lmforge` CLI has them once cli.py registers them)."""
    p = argparse.ArgumentParser(prog="lmforge", description="lmforge pretraining verbs")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    register(sub)
    from lmforge.cli import run_args  # here, not at the top: cli.py imports this module to register its verbs

    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
