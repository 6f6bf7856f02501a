"""Autoregressive decoding with a preallocated KV cache.

The per-token loop does one forward of one token per row and keeps everything else (masks, positions,
sampling) as tensor ops, so Python overhead stays small next to the matmuls.
"""

from __future__ import annotations

import torch

from lmforge.errors import GenerationError
from lmforge.model.layers import KVCache
from lmforge.model.transformer import Transformer


def _check_prompt(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise GenerationError("empty prompt: give at least one token")
    if max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.cfg.context_length:
        raise GenerationError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context length {model.cfg.context_length}"
        )


@torch.inference_mode()
def greedy(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
           attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None) -> torch.Tensor:
    """Greedy decoding; rows may be left-padded (attention_mask 0 on the left). Returns (B, T + new)."""
    _check_prompt(model, input_ids, max_new_tokens)
    B, T = input_ids.shape
    dev = input_ids.device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, T + max_new_tokens, device=dev, dtype=dtype)
    mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=dev)
    if attention_mask is not None:
        mask[:, :T] = attention_mask
    use_mask = attention_mask is not None and bool((attention_mask == 0).any())
    eos = torch.tensor(eos_ids or [], device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out = [input_ids]
    h = model(input_ids, mask[:, :T] if use_mask else None, cache=cache)[:, -1]  # (B, D)
    for step in range(max_new_tokens):
        nxt = model.lm_logits(h).argmax(-1)  # (B,)
        if eos.numel():
            pad = eos[0]
            nxt = torch.where(done, pad, nxt)
            done = done | torch.isin(nxt, eos)
        out.append(nxt[:, None])
        if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())):
            break
        S = T + step + 1
        h = model(nxt[:, None], mask[:, :S] if use_mask else None, cache=cache,
                  position_ids=_next_positions(mask, S) if use_mask else None)[:, -1]
    return torch.cat(out, dim=1)


def _next_positions(mask: torch.Tensor, S: int) -> torch.Tensor:
    """Position of the token at index S-1 of each row = real tokens before it; (B, 1)."""
    return mask[:, :S].sum(-1, keepdim=True) - 1
