"""Where a long prompt's prefill chunks end: a fixed schedule of positions, shorter chunks further in.

Why: a chunk's cost per token grows with the context it attends to (attention reads every earlier key), so a
fixed chunk size that takes a fraction of a second at the start of a prompt takes several times that thousands
of tokens in, and the running streams wait that long between two tokens. The schedule halves the chunk size each
time the modelled cost per token grows by another factor of two (rounded: at sqrt(2), 2 sqrt(2), ...), so every
chunk costs about what the first one does. The chunk ends depend only on the position (never on the load), which
batch invariance and exact prefix reuse need: a prompt is always cut at the same places, and a cached prefix that
ends on one of them is what a fresh prefill computes.
"""

from __future__ import annotations

import bisect
import math

from lmforge.config import ModelConfig

MIN_CHUNK = 16  # the smallest chunk the schedule shrinks to: below it the linears' per-call overhead dominates


def cost_growth(cfg: ModelConfig):
    """p -> the modelled cost per prompt token at context p over its cost at context 0: 1 + attention's
    multiply-adds over the earlier keys (a sliding-window layer's stop growing at its window) per the linear
    layers' multiply-adds."""
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    proj = cfg.d_model * hd * (2 * cfg.n_heads + 2 * kv)  # q, o and k, v
    ff = cfg.n_experts_active * (cfg.expert_d_ff or cfg.d_ff) if cfg.n_experts else cfg.d_ff
    mlp = cfg.d_model * ff * (3 if cfg.mlp in ("swiglu", "geglu") else 2)
    share = 2 * cfg.n_heads * hd / (proj + mlp)  # q.k and p.v per earlier key
    window = cfg.sliding_window
    if not window:
        return lambda p: 1 + p * share
    types = cfg.layer_types or ["sliding"] * cfg.n_layers
    full = sum(t != "sliding" for t in types) / max(1, len(types))  # the share of layers that see every key
    return lambda p: 1 + share * (full * p + (1 - full) * min(p, window))


def bounds(cfg: ModelConfig, chunk: int, min_chunk: int = MIN_CHUNK) -> list[int]:
    """The chunk ends of a long prompt, 0 first, up to the model's context length: chunk-sized steps while the
    cost per token is under sqrt(2) times the first one, then half, a quarter, ... (never under min_chunk, nor
    under chunk when chunk is that small already). Each step divides the position it starts at, so every end is
    a multiple of the steps after it (prefix lookups floor to an end: `floor`)."""
    growth = cost_growth(cfg)
    floor_size = min(chunk, min_chunk)
    out, p = [0], 0
    while p < cfg.context_length:
        r = round(math.log2(growth(p)))
        size = max(floor_size, chunk >> r)
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
