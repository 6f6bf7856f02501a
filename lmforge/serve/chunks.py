"""Where a long prompt's prefill chunks end: a fixed schedule of positions, shorter chunks further in.

Why: a chunk's cost per token grows with the context it attends to (attention reads every earlier key), so a
fixed chunk size that takes a fraction of a second at the start of a prompt takes several times that thousands
of tokens in, and the running streams wait that long between two tokens. The schedule gives each chunk the
largest size (a multiple of `STEP`) whose modelled cost is at most the first chunk's, so no chunk holds the
running streams longer than the first one does. (Halving the size at each doubling of the cost, as before, let
a chunk cost up to sqrt(2) times the first one: the streams' worst wait.) The chunk ends depend only on the
position (never on the load), which batch invariance and exact prefix reuse need: a prompt is always cut at the
same places, and a cached prefix that ends on one of them is what a fresh prefill computes.
"""

from __future__ import annotations

import bisect

from lmforge.config import ModelConfig

MIN_CHUNK = 16  # the smallest chunk the schedule shrinks to: below it the linears' per-call overhead dominates
STEP = 8  # chunk sizes under the first are multiples of this (whole row blocks for the linears' kernels)
# what one multiply-add of attention over the cached keys costs in time, in units of one of the linear layers':
# CPU attention (float32 SDPA over keys read from memory, between decode steps that evict them from the caches)
# runs at about two thirds of the linears' rate (docs/serving.md "Chunk schedule": how it was measured)
ATTN_COST = 1.5


def cost_growth(cfg: ModelConfig):
    """p -> the modelled cost per prompt token at context p over its cost at context 0: 1 + attention's
    multiply-adds over the earlier keys (a sliding-window layer's stop growing at its window) per the linear
    layers' multiply-adds, times ATTN_COST."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    proj = cfg.d_model * hd * (2 * cfg.n_heads + 2 * kv)  # q, o and k, v
    ff = cfg.n_experts_active * (cfg.expert_d_ff or cfg.d_ff) if cfg.n_experts else cfg.d_ff
    mlp = cfg.d_model * ff * (3 if cfg.mlp in ("swiglu", "geglu") else 2)
    share = ATTN_COST * 2 * cfg.n_heads * hd / (proj + mlp)  # q.k and p.v per earlier key
    window = cfg.sliding_window
    if not window:
        return lambda p: 1 + p * share
    types = cfg.layer_types or ["sliding"] * cfg.n_layers
    full = sum(t != "sliding" for t in types) / max(1, len(types))  # the share of layers that see every key
    return lambda p: 1 + share * (full * p + (1 - full) * min(p, window))


def chunk_cost(growth, start: int, size: int) -> float:
    """The modelled cost of the chunk [start, start + size) in units of one token at context 0: its queries attend
    to start..start + size - 1 earlier keys, start + size / 2 on average (attention's cost is linear in the keys)."""
    return size * growth(start + size / 2)


def bounds(cfg: ModelConfig, chunk: int, min_chunk: int = MIN_CHUNK) -> list[int]:
    """The chunk ends of a long prompt, 0 first, up to the model's context length: each chunk the largest size
    (`chunk`, else a multiple of STEP) whose modelled cost (`chunk_cost`) is at most the first chunk's, never under
    min_chunk (nor under chunk when chunk is that small already). Prefix lookups floor to an end (`floor`)."""
    growth = cost_growth(cfg)
    floor_size = min(chunk, min_chunk)
    limit = chunk_cost(growth, 0, chunk)
    out, p = [0], 0
    while p < cfg.context_length:
        size = chunk
        if chunk_cost(growth, p, size) > limit * (1 + 1e-9):
            size = chunk // STEP * STEP
            while size > floor_size and chunk_cost(growth, p, size) > limit:
                size -= STEP
            size = max(floor_size, size)
        p += size
        out.append(p)
    return out


class ChunkSchedule:
    """`bounds` of one model and chunk size, with the two lookups the engine makes."""

    def __init__(self, cfg: ModelConfig, chunk: int, min_chunk: int = MIN_CHUNK) -> None:
        self.chunk = chunk
        self.ends = bounds(cfg, chunk, min_chunk)

    def next_end(self, start: int, n: int) -> int:
        """The end of the chunk that runs from `start` in a prompt of n tokens (the first end past start, or n)."""
        i = bisect.bisect_right(self.ends, start)
        return n if i == len(self.ends) else min(n, self.ends[i])

    def floor(self, m: int) -> int:
        """The last chunk end at or before m: how much of a cached prefix of m tokens a prompt may reuse."""
        return self.ends[bisect.bisect_right(self.ends, m) - 1] if m < self.ends[-1] else self.ends[-1]
