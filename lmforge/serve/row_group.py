"""Row groups of the continuous batch (serve/engine.py): rows that share one left-padded KV cache.

Why groups: a left-padded cache is a rectangle as wide as its longest row, so one 4,000-token prompt among
short streams would make every short row's cache that wide: memory, and a copy of the whole rectangle at each
join, growth and drop (seconds for a small model, while every stream waits). The engine keeps rows of very
different lengths in separate groups (BatchDecoder.join picks the group) at one more model call per step each.
"""

from __future__ import annotations

import torch

from lmforge.model.cache import KVCache
from lmforge.model.multi_lora import AdapterRef


class RowGroup:
    """Rows that share one left-padded KV cache, a rectangle as wide as its longest row (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, max_len) 1 = real
        self.pos = torch.zeros(0, 1, dtype=torch.long, device=device)  # (B, 1) position of the last fed token
        self.n_real: list[int] = []  # real (non-padding) columns per row
        self.tokens: list[list[int]] = []  # the tokens behind each row's real columns (for the prefix cache)
        self.adapters: list[AdapterRef | None] = []  # each row's LoRA adapter (None: the base)
        self.ids: list[int] = []  # each row's id in the BatchDecoder

    @property
    def rows(self) -> int:
        return len(self.n_real)

    @property
    def width(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def join(self, joiners: list[tuple[KVCache, list[int], AdapterRef | None, int]], headroom: int) -> None:
        """Append rows (batch-1 caches full of their prompts, tokens, adapter, id) after this group's, in one copy;
        a lone row starting the group keeps its own cache when it has room (zeros past the prompt)."""
        if self.cache is None and len(joiners) == 1 and joiners[0][0].max_len > joiners[0][0].length:
            c, n = joiners[0][0], joiners[0][0].length
            self.cache = c
            self.mask = torch.ones(1, c.max_len, dtype=torch.long, device=self.device)
            self.pos = torch.tensor([[n - 1]], dtype=torch.long, device=self.device)
        else:
            self._copy_in([c for c, *_ in joiners], headroom)
        self.n_real += [c.length for c, *_ in joiners]
        self.tokens += [ids for _, ids, _, _ in joiners]
        self.adapters += [a for _, _, a, _ in joiners]
        self.ids += [rid for *_, rid in joiners]

    def _copy_in(self, caches: list[KVCache], headroom: int) -> None:
        old_w, B = self.width, self.rows
        ns = [c.length for c in caches]
        width = max([old_w, *ns])
        max_len = width + headroom
        ref = caches[0].k[0]
        n_kv, hd = ref.shape[1], ref.shape[3]
        ks, vs = [], []
        for i in range(len(caches[0].k)):
            for src, dst in (("k", ks), ("v", vs)):
                # every element written once: the tokens copied, zeros elsewhere (left padding, and the room for
                # the next steps). Those columns are masked, but a masked weight is 0 and 0 * nan (uninitialised
                # memory) is nan, and decode_hidden's SDPA route (CUDA, bf16, soft-capped models) reads every column
                t = ref.new_empty(B + len(caches), n_kv, max_len, hd)
                t[:, :, width:] = 0
                if B:
                    t[:B, :, : width - old_w] = 0
                    t[:B, :, width - old_w: width] = getattr(self.cache, src)[i][:, :, :old_w]
                for j, (c, n) in enumerate(zip(caches, ns)):
                    t[B + j, :, : width - n] = 0
                    t[B + j, :, width - n: width] = getattr(c, src)[i][0, :, :n]
                dst.append(t)
        self.cache = KVCache.from_tensors(ks, vs, width)
        mask = torch.ones(B + len(caches), max_len, dtype=torch.long, device=self.device)
        if B:
            mask[:B, : width - old_w] = 0
            mask[:B, width - old_w: width] = self.mask[:, :old_w]
        for j, n in enumerate(ns):
            mask[B + j, : width - n] = 0
        self.mask = mask
        self.pos = torch.cat([self.pos, torch.tensor([[n - 1] for n in ns], dtype=torch.long, device=self.device)])

    def resize(self, max_len: int) -> None:
        """Room for max_len columns (a copy): more when full; a multiple of CACHE_BUCKET for the traced step."""
        grow = max_len - self.cache.max_len
        self.cache.pad_left(0, max_len)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, grow)], 1)

    def row_kv(self, j: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Row j's tokens and their keys/values per layer (n_kv, n, hd): views, valid until the next change."""
        L, n = self.cache.length, self.n_real[j]
        return (self.tokens[j], [t[j, :, L - n: L] for t in self.cache.k], [t[j, :, L - n: L] for t in self.cache.v])

    def drop(self, rows: list[int]) -> None:
        """Remove these rows; then cut leading columns that are padding in every remaining row."""
        if not rows:
            return
        gone = set(rows)
        keep = [b for b in range(self.rows) if b not in gone]
        self.n_real = [self.n_real[b] for b in keep]
        self.tokens = [self.tokens[b] for b in keep]
        self.adapters = [self.adapters[b] for b in keep]
        self.ids = [self.ids[b] for b in keep]
        if not keep:
            self.cache = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.reorder(index)
        self.mask, self.pos = self.mask.index_select(0, index), self.pos.index_select(0, index)
        lead = self.cache.length - max(self.n_real)
        if lead > 0:
            self.cache.trim_left(lead)
            self.mask = self.mask[:, lead:]
