"""Batch-invariant decoding for `generate` / `stream_tokens` (GenerationConfig.invariant, on by default on CPU): a
row's tokens are those it gets alone, whatever other prompts share the call.

How, with the server's means (lmforge.model.invariant, quant.policy.cover_rows; docs/serving.md "Guarantees"):
- prefill: each row's prompt runs alone, unpadded, into a cache of its own, which is then copied into the batch's
  left-padded cache. A padded batch prefill would run each linear as one GEMM over B x T rows, whose blocking
  (and so each output's summation order) the library picks by the shape.
- decode steps: float linears run rows in fixed blocks, quantized ones on one integer kernel path for up to
  MAX_ROWS rows, and every step (eager or traced) is `Transformer.decode_hidden`, whose attention covers exactly
  the row's own columns (lmforge's decode_attn compacts them; without it, `Attention._rows_attention` runs SDPA
  on each row's slice). An eager and a traced step therefore run the same ops, and the "auto" rule may trace the
  batch while a lone row runs eagerly. torch.compile is left out under "auto" (inductor's code depends on the
  batch shape); an explicit compile="on" is obeyed and its steps are not invariant.
- sampling: each row draws from its own generator (GenerationConfig.seed) with its own filter and softmax call.
The model is left as it was found after the call (`invariant_decoding`). Costs: docs/generation.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lmforge.decoding.step import DecodeOptions, DecodeRuntime, static_step_unsupported
from lmforge.decoding.stepper import Stepper
from lmforge.model.cache import KVCache, StaticKV
from lmforge.model.invariant import saved_invariance, set_batch_invariant
from lmforge.model.transformer import Transformer
from lmforge.quant.policy import KernelPolicy, cover_rows

MAX_ROWS = 64  # rows one invariant call decodes (the fixed threshold of the blocked linears); generate splits more


@contextlib.contextmanager
def invariant_decoding(model: Transformer, on: bool = True) -> Iterator[None]:
    """The model's decode path made batch-invariant for up to MAX_ROWS rows for the block (a no-op when not on),
    then its layers' forwards, flags and kernel policies back as they were."""
    if not on:
        yield
        return
    restore = saved_invariance(model)
    policies = [(m, m.policy) for m in model.modules() if isinstance(getattr(m, "policy", None), KernelPolicy)]
    set_batch_invariant(model, True, max_rows=MAX_ROWS)
    cover_rows(model, MAX_ROWS)
    try:
        yield
    finally:
        restore()
        for m, p in policies:
            m.policy = p


class InvariantStepper(Stepper):
    """A Stepper whose rows each compute what they compute alone: per-row prefill, and every decode step through
    `Transformer.decode_hidden` (eager or traced alike). Models whose step cannot be static (see
    static_step_unsupported) take the eager forward, whose one-token attention is per row as well."""

    def __init__(self, runtime: DecodeRuntime, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new: int, opts: DecodeOptions | None = None) -> None:
        B, T = input_ids.shape
        # each row's real tokens, in order; the batch lays them out left-padded whatever the given mask's layout
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        self.rows = [input_ids[b][real[b]] for b in range(B)]  # (n_b,) each
        lens = torch.tensor([r.numel() for r in self.rows], device=input_ids.device)  # (B,)
        left = torch.arange(T, device=input_ids.device)[None] >= (T - lens)[:, None]  # (B, T) left-padded layout
        super().__init__(runtime, input_ids, left.long() if bool((~left).any()) else None, max_new, opts)
        self.static_rows = static_step_unsupported(self.model) is None
        self._advanced = False
        if self.static_rows and not (self.compiled or self.traced):  # the eager step's decode_hidden inputs
            L, dev = self.cache.max_len, input_ids.device
            self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)  # (B, L): real tokens written so far
            self.valid[:, :T] = left
            self.spos = lens[:, None] - 1  # (B, 1): the last real token's position
            self.col = torch.full((1,), T - 1, dtype=torch.long, device=dev)  # (1,): the last column written
            self.kv = StaticKV(self.cache.k, self.cache.v, self.col)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's prompt alone (batch 1, its own cache), copied into its left-padded place -> (B, V) float32."""
        cfg, T = self.model.cfg, self.T
        dtype = self.cache.k[0].dtype
        out = []
        for b, row in enumerate(self.rows):
            n = row.numel()
            own = KVCache(cfg, 1, n, device=row.device, dtype=dtype)
            h = self.model(row[None], cache=own)  # (1, n, D)
            out.append(self.model.lm_logits(h[:, -1]).float())  # (1, V)
            for dst, src in ((self.cache.k, own.k), (self.cache.v, own.v)):
                for t, s in zip(dst, src):
                    t[b, :, : T - n] = 0  # padding: masked, but never uninitialised (0 * nan is nan)
                    t[b, :, T - n: T] = s[0]
        self.cache.length = T
        return torch.cat(out)  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advanced = False
        return super().step(tokens)

    def _advance(self) -> None:
        super()._advance()
        self._advanced = True  # a traced / compiled step that falls back to _eager_step has advanced already

    # speculative decoding (Stepper.extend / keep): the eager steps here are the static step run eagerly, so the
    # drafts are verified, and the cache rolled back, as for a traced one
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._as_static():
            return super().extend(tokens)

    def keep(self, length: int) -> None:
        with self._as_static():
            super().keep(length)

    @contextlib.contextmanager
    def _as_static(self) -> Iterator[None]:
        eager = self.static_rows and not (self.compiled or self.traced)
        self.traced = self.traced or eager
        try:
            yield
        finally:
            self.traced = self.traced and not eager

    def _eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.static_rows:
            return super()._eager_step(tokens)
        if not self._advanced:
            self._advance()
        h = self.model.decode_hidden(tokens[:, None], self.spos, self.valid, self.kv)  # (B, D)
        self.cache.length += 1
        return self.model.lm_logits(h).float()  # (B, V)
