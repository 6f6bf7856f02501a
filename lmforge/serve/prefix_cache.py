"""Prefix reuse: keys/values of earlier sequences, so a chat's next turn prefills only what is new.

Why exact token prefixes suffice: attention is causal, so the keys/values of a sequence's first m tokens depend
only on those m tokens. Any stored sequence that shares its first m tokens with a new prompt gives the new prompt
its first m columns. A finished request stores its prompt plus the completion tokens that were fed back (the last
one never was), which is what the next turn's prompt starts with when the chat template re-encodes the reply the
same way. The batch-invariant engine instead stores prompts only, and reuses m rounded down to its prefill chunk
grid (`lookup(floor=)`): then the reused columns and the chunks after them are exactly a fresh prefill's.
Entries are evicted least recently used first, within a byte budget. Each entry belongs to a namespace
(`ns`: the LoRA adapter load that computed it, None for the base, and for the invariant engine the grid it was
prefilled on): keys/values of one adapter, or one grid, never serve another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    k: list[torch.Tensor]  # per layer (n_kv, n, hd)
    v: list[torch.Tensor]
    nbytes: int
    ns: Hashable = None  # the adapter (AdapterRef.key) whose layers computed k and v (None: the base), and grid


def common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on the slices (C-speed comparisons)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[:mid]) == tuple(b[:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """LRU store of per-sequence keys/values within `budget_bytes` (0: off). Thread-safe."""

    def __init__(self, budget_bytes: int, min_tokens: int = 4) -> None:
        self.budget, self.min_tokens = budget_bytes, min_tokens
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # (ns, tokens) -> entry
        self._lock = threading.Lock()
        self.used = 0
        self.stats = {"hits": 0, "misses": 0, "reused_tokens": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int], ns: Hashable = None, align: int = 1,
               floor: Callable[[int], int] | None = None) -> tuple[int, list[torch.Tensor], list[torch.Tensor]] | None:
        """-> (m, keys, values) for the prompt's first m tokens (m < len(prompt): one token is left to prefill),
        from entries of namespace `ns` only. align: m is a multiple of it; floor: m is floor(the longest match),
        the last boundary of a grid at or before it (the batch-invariant engine prefills in chunks on a grid, so
        that a reused prefix ends where a fresh prefill's chunk ends)."""
        if self.budget <= 0:
            return None
        with self._lock:
            best, best_m = None, 0
            for e in self._entries.values():
                if e.ns != ns or e.tokens[0] != prompt[0]:
                    continue
                m = min(common_prefix(e.tokens, prompt), len(prompt) - 1)
                m -= m % align
                if floor is not None:
                    m = floor(m)
                if m > best_m:
                    best, best_m = e, m
            if best is None or best_m < self.min_tokens:
                self.stats["misses"] += 1
                return None
            self._entries.move_to_end((best.ns, best.tokens))
            self.stats["hits"] += 1
            self.stats["reused_tokens"] += best_m
            return best_m, [t[:, :best_m] for t in best.k], [t[:, :best_m] for t in best.v]

    def store(self, tokens: list[int], k: list[torch.Tensor], v: list[torch.Tensor], ns: Hashable = None,
              copy: bool = True) -> None:
        """Keep (n_kv, n, hd) keys/values per layer of `tokens` (n of them) in namespace `ns`. copy: keep copies,
        so callers may reuse theirs; False: keep the tensors given (views whose first n columns nobody writes
        again, e.g. a prefill's own cache: no copy of a long prompt's keys/values while rows wait), counted at
        their whole storage."""
        if self.budget <= 0 or len(tokens) < self.min_tokens:
            return
        if copy:
            nbytes = sum(t.numel() * t.element_size() for t in (*k, *v))
        else:
            nbytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*k, *v)}.values())
        if nbytes > self.budget:
            return
        key = tuple(tokens)
        with self._lock:
            for old in [(s, t) for s, t in self._entries if s == ns and len(t) <= len(key) and key[: len(t)] == t]:
                self.used -= self._entries.pop(old).nbytes  # a prefix of the new entry adds nothing
            if any(s == ns and len(t) > len(key) and t[: len(key)] == key for s, t in self._entries):
                return  # an existing entry already covers this one
            while self._entries and self.used + nbytes > self.budget:
                self.used -= self._entries.popitem(last=False)[1].nbytes
            if copy:
                k, v = [t.clone() for t in k], [t.clone() for t in v]
            self._entries[(ns, key)] = _Entry(key, list(k), list(v), nbytes, ns)
            self.used += nbytes
