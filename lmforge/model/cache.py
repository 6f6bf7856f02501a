"""The KV cache: keys and values of every layer, preallocated (`KVCache`), and the one-column view a static
decode step writes through (`StaticKV`)."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv, max_len, hd) each, filled up to `length`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens stored; advanced by the model after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, T, hd) -> all keys/values so far: (B, n_kv, length+T, hd)
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        ck, cv = self.k[layer], self.v[layer]
        ck.narrow(2, start, end - start).copy_(k)  # narrow: one op where [:, :, a:b] is three
        cv.narrow(2, start, end - start).copy_(v)
        return ck.narrow(2, 0, end), cv.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    # -- continuous batching (serve/engine.py): rows are left-padded, so columns may be added or cut on the left
    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor], length: int) -> KVCache:
        """A cache over existing (B, n_kv, max_len, hd) tensors of which the first `length` columns are filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.length = k, v, k[0].shape[2], length
        return cache

    def pad_left(self, n: int, max_len: int | None = None) -> None:
        """Shift the stored columns right by n zero columns (to be masked out), into room for max_len columns."""
        max_len = max(max_len or 0, self.length + n)
        B, kv, _, hd = self.k[0].shape

        def moved(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(B, kv, max_len, hd)
            out[:, :, n: n + self.length] = t[:, :, : self.length]
            return out

        self.k, self.v = [moved(t) for t in self.k], [moved(t) for t in self.v]
        self.length, self.max_len = self.length + n, max_len

    def trim_left(self, n: int) -> None:
        """Drop the first n columns (padding in every row); a view, no copy."""
        self.k = [t[:, :, n:] for t in self.k]
        self.v = [t[:, :, n:] for t in self.v]
        self.length, self.max_len = self.length - n, self.max_len - n

    # -- speculative verification (Attention._verify_rows): T new rows of one sequence, `verify_rows` set
    verify_rows: str | None = None  # "static" | "eager" while Stepper.extend runs its forward
    _verify_memo: tuple = ()

    def verify_inputs(self, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns the T rows write, (T,) long, and their additive masks over all columns, (T, L): row i sees
        the columns up to length + i. Built once per forward, not once per layer."""
        dev, L = self.k[0].device, self.k[0].shape[2]
        key = (self.length, T, dtype, L, dev)
        if self._verify_memo[:1] != (key,):
            cols = torch.arange(self.length, self.length + T, device=dev)  # (T,)
            mask = torch.zeros(T, L, dtype=dtype, device=dev).masked_fill(
                torch.arange(L, device=dev)[None, :] > cols[:, None], float("-inf"))  # (T, L)
            self._verify_memo = (key, cols, mask)
        return self._verify_memo[1], self._verify_memo[2]


class VerifyKV(KVCache):
    """A KVCache's tensors seen by a traced speculative verification (DecodeRuntime.verify_hidden): the columns
    the T rows write and their masks are the trace's tensor inputs, not values computed from `length`, so one
    trace serves every round of T rows. Only the one-pass ("static", decode_attn) rows of
    Attention._verify_rows may run over it: they read nothing else (`length` is no position here)."""

    verify_rows = "static"

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], cols: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self.max_len, self.length = k, v, k[0].shape[2], -1
        self.cols, self.mask = cols, mask  # (T,) long, (T, L) additive

    def verify_inputs(self, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cols, self.mask


class StaticKV:
    """A KVCache seen by one static-shape decode step (generate's compiled step): `update` writes the new
    column at `col`, a (1,) long tensor rather than a Python int, and returns the whole preallocated
    (B, n_kv, max_len, hd) tensors, so every step has the same shapes and torch.compile traces it once.
    Columns not yet written (zeros) or padding are removed by the step's mask; `length` is not touched."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], col: torch.Tensor) -> None:
        self.k, self.v, self.col = k, v, col  # a KVCache's per-layer tensors; col: (1,) long

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, 1, hd) -> every column: (B, n_kv, max_len, hd)
        self.k[layer].index_copy_(2, self.col, k)
        self.v[layer].index_copy_(2, self.col, v)
        return self.k[layer], self.v[layer]
