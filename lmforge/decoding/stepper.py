"""One batch's decode steps: the KV cache, mask and positions of a left-padded batch, and the step that its
runtime chose (eager, traced or compiled). The prefill always runs eagerly, into the same cache."""

from __future__ import annotations

import torch

from lmforge.decoding.step import DecodeOptions, DecodeRuntime, cache_bucket
from lmforge.model.cache import KVCache, StaticKV


class Stepper:
    """Owns the cache and mask of one batch; `step(tokens)` feeds one token per row, returns logits (B, V)."""

    def __init__(self, runtime: DecodeRuntime, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new: int, opts: DecodeOptions | None = None) -> None:
        B, T = input_ids.shape
        model = runtime.model
        self.runtime, self.model, self.T = runtime, model, T
        dev = input_ids.device
        dtype = next(model.parameters()).dtype
        self.opts = opts if opts is not None else DecodeOptions()
        self.key = (B, cache_bucket(T + max_new), dtype, dev)
        self.compiled = self.cudagraphs = self.traced = False
        # a trace made before a weight or kernel-policy change must not be reused: check (a walk over every tensor)
        # before a plan that may reuse one, or before making one
        refreshed = self.opts.compile != "off" and bool(runtime.traces)
        if refreshed:
            runtime.refresh()
        plan = runtime.plan(self.opts, self.key, max_new - 1)
        if plan == "trace" and not refreshed:
            runtime.refresh()
        if plan != "eager":
            self._setup_static(attention_mask, plan)
        else:
            self.cache = KVCache(model.cfg, B, T + max_new, device=dev, dtype=dtype)
        self.mask = torch.ones(B, T + max_new, dtype=torch.long, device=dev)
        if attention_mask is not None:
            self.mask[:, :T] = attention_mask.to(dev)
        # with no padding the model's cheaper mask-free path is exact
        self.padded = attention_mask is not None and bool((attention_mask == 0).any())
        self.pos = (self.mask[:, :T].sum(-1, keepdim=True) - 1) if self.padded else None  # (B, 1)

    def _setup_static(self, attention_mask: torch.Tensor | None, plan: str) -> None:
        """The cache and the static step's inputs (updated in place each step): valid columns, positions, the
        column written. The cache also serves the eager step, should the capture fail."""
        B, L, dtype, dev = self.key
        rt = self.runtime
        free = rt.pool.get(self.key)
        self.cache = free.pop() if free else KVCache(self.model.cfg, B, L, device=dev, dtype=dtype)
        self.cache.length = 0
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)  # (B, L): real tokens written so far
        self.valid[:, :self.T] = True if attention_mask is None else attention_mask.to(dev).bool()
        self.spos = self.valid[:, :self.T].sum(-1, keepdim=True) - 1  # (B, 1): the last real token's position
        self.col = torch.full((1,), self.T - 1, dtype=torch.long, device=dev)  # (1,): the last column written
        self.kv = StaticKV(self.cache.k, self.cache.v, self.col)
        if plan == "trace":
            self.traced = True
            self.opts.path = f"traced (torch.jit.trace, {dev.type}, cache length {L})"
            return
        try:
            self.fn = rt.compiled(self.opts.mode, dev)
        except Exception as e:  # noqa: BLE001 - torch too old, a bad mode, ...: report it, decode eagerly
            self._fail(e)
            return
        self.compiled = True
        self.cudagraphs = dev.type == "cuda" and "reduce-overhead" in rt.compile_mode
        if self.cudagraphs:  # CUDA graphs replay fixed addresses: pooled caches keep theirs (see close())
            for t in (*self.cache.k, *self.cache.v):
                torch._dynamo.mark_static_address(t)
        self.opts.path = f"compiled (inductor, {dev.type}, mode {rt.compile_mode}, cache length {L})"

    def _fail(self, e: BaseException) -> None:
        self.opts.path = f"eager (torch.compile failed: {self.runtime.fail_compile(e)})"
        self.compiled = self.cudagraphs = False

    def close(self) -> None:
        """Give a CUDA-graph cache back to the runtime's pool (the next batch of that shape reuses it)."""
        if self.cudagraphs:
            self.runtime.pool.setdefault(self.key, []).append(self.cache)
            self.cudagraphs = False

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids, self.mask[:, : self.T] if self.padded else None, cache=self.cache)
        return self.model.lm_logits(h[:, -1]).float()  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return self._compiled_step(tokens)
        if self.traced:
            return self._traced_step(tokens)
        self.runtime.count_eager(self.key)
        return self._eager_step(tokens)

    def _advance(self) -> None:
        self.col += 1
        self.spos += 1
        self.valid.index_fill_(1, self.col, True)

    def _compiled_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advance()
        rt, first = self.runtime, self.key not in self.runtime.compiled_keys
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            h = self.fn(self.model, tokens[:, None], self.spos, self.valid, self.kv)  # (B, D)
        except Exception as e:  # noqa: BLE001 - any compile error: report it, then decode eagerly
            if not first:
                raise  # a compiled step that fails later is a bug to see, not a fallback
            self._fail(e)  # the cache (length, the columns before it) is the eager step's as well
            return self._eager_step(tokens)
        if first:
            rt.compiled_keys.add(self.key)
        self.cache.length += 1  # kept in step, so that the eager step could take over
        return self.model.lm_logits(h).float()  # (B, V); reads h before the next replay overwrites it

    def _traced_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advance()
        rt = self.runtime
        h = rt.run_traced(self.key, (tokens[:, None], self.spos, self.valid, self.col, self.cache.k, self.cache.v))
        if h is None:
            self.opts.path = f"eager (torch.jit.trace failed: {rt.trace_failed})"
            self.traced = False
            return self._eager_step(tokens)
        rt.count_eager(self.key)  # uncompiled steps, for "auto"
        self.cache.length += 1  # kept in step, so that the eager step could take over
        return self.model.lm_logits(h).float()  # (B, V)

    def _eager_step(self, tokens: torch.Tensor) -> torch.Tensor:
        S = self.cache.length + 1
        if self.padded:
            self.pos = self.pos + 1
            h = self.model(tokens[:, None], self.mask[:, :S], position_ids=self.pos, cache=self.cache)
        else:
            h = self.model(tokens[:, None], cache=self.cache)
        return self.model.lm_logits(h[:, -1]).float()  # (B, V)

    # ---- speculative decoding (decoding/speculative.py): one unpadded row --------------------------------------
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed n tokens (1, n) in one eager forward over the cache (the n drafts a speculative step verifies)
        -> float32 logits (n, V), one per position. Each position's attention runs as this batch's one-token
        step runs it (Attention._verify_rows: the projections and MLP run once over the n rows; the attention is
        one decode_attn call for all rows where the step runs decode_attn, else one call per position),
        so the logits are the step's bit for bit where the other ops are row-invariant; not for sliding-window
        models, whose step masks differ per layer (there the n positions run as one masked SDPA call).
        Where the steps replay a trace, speculative.verify_logits runs the traced verification instead
        (DecodeRuntime.verify_hidden: the same numbers, without the eager forward's per-op overhead)."""
        cfg = self.model.cfg
        sliding = bool(cfg.sliding_window) and cfg.layer_types is not None and "sliding" in cfg.layer_types
        self.cache.verify_rows = None if sliding else ("static" if self.compiled or self.traced else "eager")
        try:
            h = self.model(tokens, cache=self.cache)  # (1, n, D)
        finally:
            self.cache.verify_rows = None
        return self.model.lm_logits(h[0]).float()  # (n, V)

    def keep(self, length: int) -> None:
        """Roll the cache back to its first `length` columns (the rejected drafts' keys and values are left to be
        overwritten); the static step's column, position and valid columns follow."""
        self.cache.length = length
        if self.compiled or self.traced:
            self.col.fill_(length - 1)
            self.spos.fill_(length - 1)
            self.valid[:, :length] = True
            self.valid[:, length:] = False

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        if self.pos is not None:
            self.pos = self.pos.index_select(0, index)
