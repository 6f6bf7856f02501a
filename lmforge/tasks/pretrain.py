"""Pretraining a causal LM from raw text: tokenizer -> token cache -> packed blocks -> Trainer -> model dir.

The tokenizer is trained on the data (byte-level BPE, cached by data + settings) unless one is given or
the run continues a pretrained model (--init-from, whose config and tokenizer it keeps). The corpus is
tokenized once into a memory-mapped cache (lmforge.data.tokens) with a held-out validation split, packed
into (context + 1)-token blocks whose order depends only on (seed, epoch), and trained with the shared
Trainer: AdamW, warmup + cosine, accumulation, clipping, exact resume, time budget. Each evaluation
reports validation loss and perplexity, the training throughput with its model FLOPs utilisation (MFU),
and prints a few sampled continuations of held-out text (rank 0).

Run directory: the Trainer's files (metrics.jsonl, curves.png, checkpoints/, final/), pretrain_config.json
and model_config.json (what --resume rebuilds from), tokenizer/ (the tokenizer of the run), summary.json,
and at the root the final model as a Hugging Face directory (config.json, model.safetensors, tokenizer
files) that `lmforge generate --model RUN_DIR` and transformers' AutoModelForCausalLM load.

Under torchrun every rank runs this; one-time work (tokenizer training, the token cache) runs on local
rank 0 while the others wait, each rank trains on its own shard of the batches, and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.data.tokens import (
    PackedBatches,
    TokenCache,
    build_token_cache,
    check_text_files,
    eval_blocks,
    expand_files,
    fingerprint_files,
)
from lmforge.errors import ConfigError, DataError, TokenizerError, TrainingError
from lmforge.flops import flops_per_token, peak_flops
from lmforge.io import atomic_dir, cache_root
from lmforge.model.heads import CausalLM, lm_loss
from lmforge.model.transformer import Transformer, set_dropout
from lmforge.tasks.common import TaskRun, run_training, write_json
from lmforge.train.strategy import all_reduce_sum, choose_strategy, dist_info, is_fsdp, leader_first

CONFIG_FILE = "pretrain_config.json"
EVAL_METRICS = ("val_loss", "perplexity", "tokens_per_s", "mfu")
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
INFO_FILE = "pretrain.json"
ENDOFTEXT = "<|endoftext|>"


@dataclass
class PretrainConfig:
    """What to train on and which model; the loop's own knobs (steps, lr, batch, ...) are in TrainConfig."""

    data: list[str] = field(default_factory=list)  # files and/or directories
    model_config: str | None = "gpt2-tiny"  # a preset name or a JSON config (ours or a HF config.json)
    init_from: str | None = None  # continue pretraining this model (its config and tokenizer)
    tokenizer: str | None = None  # a tokenizer dir/file or a model whose tokenizer to use; None = train one
    vocab_size: int | None = None  # model vocabulary (and trained tokenizer size); None = the config's
    context_length: int | None = None  # tokens per training block; None = min(config maximum, 1024)
    val_fraction: float = 0.05  # tail of every file held out for validation (when no val_data)
    val_data: list[str] | None = None  # held-out files (taken out of `data` if they are in it)
    cache_dir: str | None = None  # token cache root; None = $LMFORGE_CACHE/tokens
    eval_tokens: int = 262144  # validation tokens scored per evaluation (0 = all)
    eval_batch_size: int | None = None  # None = the training batch size
    samples: int = 2  # sampled continuations printed at each evaluation (0 = none)
    sample_tokens: int = 40
    dropout: float | None = None  # None = the config's
    min_frequency: int = 2  # BPE merges need a pair seen at least this often
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP (torchrun)
    peak_flops: float | None = None  # per-device FLOP/s for MFU; None = measured (matmul) and cached

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- CPU allocator --------------------------------------------------------------------------------------
def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc malloc: no mmap for big blocks, no trimming), so the large
    tensors every training step allocates and frees again are not fresh pages each time.

    Why: glibc serves blocks above 32 MiB with mmap and returns them on free, so every step page-faults on
    (and the kernel zeroes) all of them again; with this, next to none, and peak RSS does not grow (see
    docs/benchmarks.md). Linux/glibc only; LMFORGE_MALLOC_TUNING=0 skips it.
    Returns whether it was applied. Process-wide, so the `lmforge pretrain` verb calls it (on CPU), not
    the library function pretrain(), which may run inside a longer-lived process.
    """
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("LMFORGE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # mallopt parameters of glibc's malloc.h
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok  # int: the largest value mallopt takes
        return libc.mallopt(m_top_pad, 64 * 2**20) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False


# ---- tokenizer -----------------------------------------------------------------------------------------
def train_tokenizer(files: list[Path], vocab_size: int, special_tokens: list[str] | tuple[str, ...] = (ENDOFTEXT,),
                    min_frequency: int = 2):
    """Byte-level BPE on `files`, after checking each is UTF-8 text and that there is some text at all."""
    from lmforge.tokenizer import Tokenizer

    specials = list(dict.fromkeys(special_tokens))
    if vocab_size < 256 + len(specials):
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: the byte alphabet needs 256 tokens and "
                             f"there are {len(specials)} special token(s), so at least {256 + len(specials)}")
    check_text_files(files)
    if not any(Path(f).stat().st_size and _has_text(Path(f)) for f in files):
        raise DataError(f"empty corpus: no text in {len(files)} file(s) ({', '.join(str(f) for f in files[:3])})")
    tok = Tokenizer.train_bpe([Path(f) for f in files], vocab_size, specials, min_frequency=min_frequency)
    return tok


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if block.strip():
                return True
    return False


def _trained_tokenizer(files: list[Path], vocab_size: int, min_frequency: int, root: Path, log) -> Any:
    """Get-or-train a BPE tokenizer for `files` in the cache (keyed by the files, size and settings)."""
    from lmforge.tokenizer import Tokenizer

    spec = {"files": fingerprint_files(files), "vocab": vocab_size, "min_frequency": min_frequency,
            "specials": [ENDOFTEXT], "version": 1}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    d = root / key
    if (d / "tokenizer.json").is_file():
        log(f"tokenizer: reused {d} (trained on the same files)")
        return Tokenizer.from_dir(d)
    t0 = time.perf_counter()
    tok = train_tokenizer(files, vocab_size, [ENDOFTEXT], min_frequency)
    with atomic_dir(d, keep_existing=True) as tmp:  # a concurrent run may train the same one
        tok.save(tmp)
    log(f"tokenizer: trained byte-level BPE, {tok.vocab_size} tokens, on {len(files)} file(s) in "
        f"{time.perf_counter() - t0:.1f}s -> {d}")
    return Tokenizer.from_dir(d)


def load_tokenizer(name: str):
    """A tokenizer dir / tokenizer.json / GGUF, or a model name or path whose tokenizer to take."""
    from lmforge.tokenizer import Tokenizer

    p = Path(name)
    if p.exists():
        return Tokenizer.from_pretrained(p)
    from lmforge.checkpoints import resolve

    try:
        path, _ = resolve(name)
    except Exception as e:  # noqa: BLE001 - resolve raises lmforge errors or hub errors
        raise TokenizerError(f"--tokenizer {name}: not a tokenizer path or a known model ({e})") from None
    return Tokenizer.from_pretrained(path)


# ---- config --------------------------------------------------------------------------------------------
def resolve_model_config(name: str | None, vocab_size: int | None = None) -> ModelConfig:
    name = name or "gpt2-tiny"
    if name in PRESETS:
        cfg = preset(name)
    elif Path(name).is_file():
        cfg = ModelConfig.load(name)
    else:
        raise ConfigError(f"--model-config {name}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    if not cfg.causal:
        raise ConfigError(f"--model-config {name}: a bidirectional encoder ({cfg.family}) cannot be pretrained "
                          "as a causal LM")
    if vocab_size is not None:
        if vocab_size < 1:
            raise ConfigError(f"--vocab-size must be >= 1, got {vocab_size}")
        cfg.vocab_size = vocab_size
    return cfg


# ---- the run -------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    cfg: ModelConfig
    tokenizer: Any
    model: Transformer
    context: int
    source: str  # what the model and tokenizer came from, for the log


def _setup(c: PretrainConfig, run_dir: Path, resume: bool, train_files: list[Path], log) -> _Setup:
    from lmforge.tokenizer import Tokenizer

    if resume:
        cfg = ModelConfig.load(run_dir / MODEL_CONFIG_FILE)
        tok = Tokenizer.from_dir(run_dir / TOKENIZER_DIR)
        return _Setup(cfg, tok, Transformer(cfg), int(c.context_length or cfg.context_length), "resumed run")
    if c.init_from:
        if c.vocab_size is not None:
            raise ConfigError("--vocab-size cannot change a pretrained model (--init-from); drop it")
        from lmforge.checkpoints import load_checkpoint

        ck = load_checkpoint(c.init_from)
        if not ck.cfg.causal:
            raise ConfigError(f"--init-from {c.init_from}: a bidirectional encoder ({ck.cfg.family}), not a "
                              "causal LM")
        tok = load_tokenizer(c.tokenizer) if c.tokenizer else ck.tokenizer
        if tok is None:
            raise TokenizerError(f"--init-from {c.init_from}: the model has no tokenizer files; pass --tokenizer")
        model, cfg = ck.model, ck.cfg
        model.train()
        if c.dropout is not None:
            set_dropout(model, c.dropout)
        source = f"init from {c.init_from}"
    else:
        cfg = resolve_model_config(c.model_config, c.vocab_size)
        if c.tokenizer:
            tok = load_tokenizer(c.tokenizer)
            source = f"--model-config {c.model_config}, tokenizer {c.tokenizer}"
        else:
            if c.context_length is not None and c.context_length > cfg.context_length:  # fail before training BPE
                raise ConfigError(f"--context-length {c.context_length} is above the maximum of the model "
                                  f"config ({cfg.context_length}, --model-config {c.model_config})")
            root = Path(c.cache_dir) / "tokenizers" if c.cache_dir else cache_root() / "tokenizers"
            tok = leader_first(lambda: _trained_tokenizer(train_files, cfg.vocab_size, c.min_frequency, root, log))
            source = f"--model-config {c.model_config}, BPE tokenizer trained on the data"
        if c.dropout is not None:
            cfg.dropout = c.dropout
        model = None  # built below, after the checks and under the run's seed
    if tok.vocab_size > cfg.vocab_size:
        what = f"--init-from {c.init_from}" if c.init_from else f"--model-config {c.model_config}"
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but the model's embeddings have {cfg.vocab_size} "
                          f"rows ({what}): use --vocab-size {tok.vocab_size} or a tokenizer that fits")
    context = c.context_length or min(cfg.context_length, 1024)
    if context > cfg.context_length:
        raise ConfigError(f"--context-length {context} is above the maximum of the model config "
                          f"({cfg.context_length})")
    if context < 2:
        raise ConfigError(f"--context-length must be >= 2, got {context}")
    if not c.init_from:
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_id, tok.eos_id
    tok.model_max_length = cfg.context_length
    if model is None:
        model = Transformer(cfg)
        model.reset_parameters()  # GPT-2 init, residual projections scaled by depth
    return _Setup(cfg, tok, model, context, source)


def pretrain(c: PretrainConfig, tc, resume: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pretrain (or continue pretraining) a causal LM on raw text; returns the run summary.

    tc: a TrainConfig. Call lmforge.train.strategy.init_distributed() first when launched by torchrun.
    """
    from lmforge.train import seed_everything

    info = dist_info()
    say: Callable[[str], None] = log or (lambda m: print(m, file=sys.stderr))
    log = say if info.is_main else (lambda m: None)
    run_dir = Path(tc.output_dir)
    if resume and not (run_dir / CONFIG_FILE).is_file():
        raise TrainingError(f"{run_dir}: not a pretraining run (no {CONFIG_FILE})")
    if c.fsdp and info.world_size < 2:
        raise TrainingError("--fsdp shards across processes: launch with torchrun --nproc-per-node N (N >= 2)")
    if not c.data:
        raise DataError("--data: no training files given")
    if c.val_data is None and not 0.0 <= c.val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {c.val_fraction}")
    val_files = expand_files(c.val_data, "--val-data") if c.val_data else []
    train_files = [f for f in expand_files(c.data) if f not in set(val_files)]
    if not train_files:
        raise DataError("--data: every training file is also a --val-data file; nothing left to train on")

    seed_everything(tc.seed)
    s = _setup(c, run_dir, resume, train_files, log)
    cfg, tok, T = s.cfg, s.tokenizer, s.context
    cache_dir = Path(c.cache_dir) if c.cache_dir else cache_root() / "tokens"
    cache: TokenCache = leader_first(lambda: build_token_cache(
        train_files, tok, cache_dir, val_files=val_files, val_fraction=0.0 if val_files else c.val_fraction,
        log=log))
    saved_config = {**c.to_dict(), "context_length": T, "data": [str(p) for p in c.data]}
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run rebuilds its model and tokenizer from these: never rewritten
            with atomic_dir(run_dir / TOKENIZER_DIR) as tmp:
                tok.save(tmp)
            write_json(run_dir / MODEL_CONFIG_FILE, {**cfg.to_dict(), "context_length": cfg.context_length})
            write_json(run_dir / CONFIG_FILE, saved_config)

    data = PackedBatches(cache.train, T, tc.batch_size, seed=tc.seed)
    model = CausalLM(s.model)
    n_params = s.model.num_parameters()
    tokens_per_step = tc.batch_size * tc.grad_accum * info.world_size * T
    fpt = flops_per_token(cfg, T)
    log(f"model: {cfg.family}, {n_params / 1e6:.2f}M parameters ({s.source}); context {T}; vocab {tok.vocab_size} "
        f"tokens in {cfg.vocab_size} embedding rows")
    log(f"data: {cache.train_tokens:,} train / {cache.val_tokens:,} validation tokens; {len(data)} batches per epoch"
        f"{' per rank' if info.world_size > 1 else ''}; {tokens_per_step:,} tokens per step over "
        f"{info.world_size} process(es)")

    evaluator = _Evaluator(c, cache, tok, T, tc, run_dir, fpt, log)
    eval_fn = evaluator if cache.val_tokens > 1 else None
    if eval_fn is None:
        log("validation: no held-out tokens (--val-fraction 0 and no --val-data): no validation loss")

    def export(_m: nn.Module, d: Path, full_sd: dict[str, torch.Tensor]) -> None:
        """From the full state dict, so a sharded (FSDP) model exports the same way as a plain one."""
        from lmforge.checkpoints import save_hf

        body = {k[len("backbone."):]: v for k, v in full_sd.items() if k.startswith("backbone.")}
        save_hf(Path(d), cfg, body, tokenizer=tok)
        meta = {"context_length": T, "init_from": c.init_from, "data": [str(f) for f in cache.meta["train_files"]],
                "val_data": cache.meta["val_files"], "val_fraction": cache.meta["val_fraction"],
                "token_cache": str(cache.dir)}
        write_json(Path(d) / INFO_FILE, meta)

    def finish(_result) -> dict[str, Any]:
        rates = evaluator.rates(all_records=True)
        tok_s = statistics.median(rates) if rates else None
        return {"tokens_per_s": tok_s, "mfu": None if tok_s is None else tok_s * fpt / evaluator.peak,
                "peak_flops": evaluator.peak, "mfu_precision": evaluator.precision}

    # FSDP shards for the precision the Trainer resolves (bf16 None)
    strategy = choose_strategy(fsdp=c.fsdp, fsdp_layers=list(model.backbone.blocks))
    run = TaskRun("pretrain", saved_config, model, data, lm_loss, save_fn=export, eval_fn=eval_fn,
                  eval_metrics=EVAL_METRICS, marker=INFO_FILE, strategy=strategy, write_config=False,
                  on_start=evaluator.start,
                  summary={"parameters": n_params, "context_length": T,
                           "world_size": info.world_size, "fsdp": c.fsdp, "model_flops_per_token": fpt,
                           "data": {"train_tokens": cache.train_tokens, "val_tokens": cache.val_tokens,
                                    "cache": str(cache.dir), "cache_reused": cache.reused}})
    summary = run_training(run, tc, resume=resume, finish=finish)
    summary["tokens_seen"] = summary["steps"] * tokens_per_step
    return summary


class _Evaluator:
    """eval_fn: validation loss/perplexity (sharded over ranks under DDP), throughput and MFU of the
    training since the last evaluation (from metrics.jsonl, rank 0), and sampled continuations.

    start(trainer) runs once the Trainer has settled its device and precision: the MFU peak is the one of
    that precision (a resumed run may compute in the precision it recorded, not what auto picks here)."""

    def __init__(self, c: PretrainConfig, cache: TokenCache, tok, T: int, tc, run_dir: Path, fpt: float,
                 log) -> None:
        self.tok, self.T, self.run_dir, self.fpt, self.log = tok, T, run_dir, fpt, log
        self.given_peak = c.peak_flops
        self.device = torch.device("cpu")  # the Trainer's, from start()
        self.peak = float("nan")  # FLOP/s over all ranks in the Trainer's precision, from start()
        self.precision: str | None = None
        self.blocks = eval_blocks(cache.val, T, c.eval_tokens or None)
        self.batch = c.eval_batch_size or tc.batch_size
        self.n_samples, self.sample_tokens = c.samples, c.sample_tokens
        src = cache.val if cache.val_tokens > T else cache.train
        plen = max(1, min(16, T // 4))
        room = T - plen
        self.sample_tokens = min(self.sample_tokens, room)
        n = len(src) - plen
        self.prompts = [np.asarray(src[p: p + plen], dtype=np.int64)
                        for p in np.linspace(0, max(n - 1, 0), num=max(c.samples, 0) + 2)[1:-1].astype(int)]
        self._seen = 0  # metrics.jsonl throughput records already reported
        self._evals = 0

    def start(self, trainer) -> None:
        """Take the Trainer's device and precision; measure (or take the given) peak for MFU. Every rank."""
        info = dist_info()
        self.device, self.precision = trainer.device, trainer.precision.name
        dtype = torch.bfloat16 if trainer.precision.bf16 else torch.float32
        per_rank = self.given_peak or peak_flops(self.device, dtype)
        self.peak = all_reduce_sum([per_rank], self.device)[0]
        self.log(f"flops: {self.fpt / 1e6:.1f} MFLOP per token (6N + attention); peak {self.peak / 1e9:.1f} "
                 f"GFLOP/s in {self.precision} ({'given' if self.given_peak else 'measured matmul'}"
                 f"{f', {info.world_size} ranks' if info.world_size > 1 else ''})")

    def rates(self, all_records: bool = False) -> list[float]:
        from lmforge.train import read_metrics

        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        recs = [r["tokens_per_s"] for r in read_metrics(path) if "tokens_per_s" in r]
        if all_records:
            return recs
        new, self._seen = recs[self._seen:], len(recs)
        return new

    @torch.no_grad()
    def __call__(self, m: nn.Module) -> dict[str, float]:
        info = dist_info()
        sharded = is_fsdp(m)
        mine = self.blocks if sharded or info.world_size == 1 else self.blocks[info.rank::info.world_size]
        total, count = 0.0, 0
        full = [b for b in mine if len(b) == self.T + 1]
        for s in range(0, len(full), self.batch):
            x = torch.from_numpy(np.stack(full[s: s + self.batch])).to(self.device)  # (B, T+1)
            total += float(m(x[:, :-1], x[:, 1:], reduction="sum"))
            count += x[:, 1:].numel()
        for b in mine:
            if len(b) != self.T + 1 and len(b) > 1:
                x = torch.from_numpy(b[None]).to(self.device)
                total += float(m(x[:, :-1], x[:, 1:], reduction="sum"))
                count += len(b) - 1
        if not sharded:
            total, count = all_reduce_sum([total, float(count)], self.device)
        loss = total / max(count, 1)
        out = {"val_loss": loss, "perplexity": math.exp(min(loss, 80.0))}
        if info.is_main:
            rates = self.rates()
            if rates:
                tps = statistics.mean(rates)
                out.update(tokens_per_s=tps, mfu=tps * self.fpt / self.peak)
        self._evals += 1
        if self.n_samples and self.sample_tokens > 0 and (sharded or info.is_main):
            self._samples(m.backbone if hasattr(m, "backbone") else m, sharded)
        return out

    def _samples(self, backbone: Transformer, sharded: bool) -> None:
        from lmforge.decoding import GenerationConfig, generate

        lines = []
        for i, p in enumerate(self.prompts):
            gc = GenerationConfig(max_new_tokens=self.sample_tokens, temperature=0.8, top_k=50, seed=1234 + i)
            ids = torch.from_numpy(p[None]).to(self.device)
            try:
                out = generate(backbone, ids, None, gc)[0]
            except RuntimeError as e:  # e.g. a sharded model that cannot decode outside its forward
                self.log(f"  samples skipped: {' '.join(str(e).split())[:200]}")
                return
            prompt = self.tok.decode(p.tolist(), skip_special_tokens=False)
            lines.append(f"  sample {i + 1}: {prompt!r} -> {self.tok.decode(out, skip_special_tokens=False)!r}")
        self.log("\n".join(lines))
