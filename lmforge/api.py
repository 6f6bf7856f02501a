"""The Python front door: what the README shows."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.checkpoints import Loaded, load_checkpoint
from lmforge.errors import TokenizerError
from lmforge.model.heads import embed as _embed
from lmforge.model.transformer import Transformer


def load(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """A built-in name, HF directory, GGUF file or hub id -> (model, tokenizer)."""
    ck = load_checkpoint(name_or_path, dtype=_dtype(dtype), device=device)
    return ck.model, ck.tokenizer


def load_full(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> Loaded:
    """Like load(), with where it came from, its format and size (what `lmforge info` prints)."""
    return load_checkpoint(name_or_path, dtype=_dtype(dtype), device=device)


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if d not in table:
        from lmforge.errors import ConfigError
        raise ConfigError(f"dtype {d!r} is not one of {sorted(table)}")
    return table[d]


@torch.inference_mode()
def embed_texts(model: Transformer, tokenizer, texts: list[str], batch_size: int = 32,
                normalize: bool = False, max_length: int | None = None) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, D), batched by length so padding stays small."""
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer files: cannot embed text")
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.cfg.d_model)
    dev = next(model.parameters()).device
    for s in range(0, len(texts), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer.encode_batch([texts[i] for i in idx], max_length=max_length)
        tt = enc.get("token_type_ids")
        e = _embed(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                   None if tt is None else tt.to(dev), normalize=normalize)
        out[idx] = e.float().cpu()
    return out
