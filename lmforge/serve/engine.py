"""The continuous-batching decode engine: rows join and leave a running batch between decode steps.

Why this works with the plain model API: the model runs left-padded batches exactly (position ids come from
each row's own token count, padding columns are masked out). A joining prompt is prefilled alone (batch 1,
its own cache, reusing a cached prefix when one matches), then its keys/values are merged into a row group's
cache (serve/row_group.py) by left-padding whichever side is shorter; rows of very different lengths go to
different groups, so a long prompt does not widen every short row's cache. A row that ends is dropped with
index_select, and leading columns that became padding in every row are cut, so a group's cache is never wider
than its longest row.

A prompt is prefilled in chunks (`PrefillJob`, `prefill_chunk` tokens per forward) so the scheduler can run
the running rows' decode steps between them. Batch invariance (`invariant`): the model's float linears run rows
in fixed blocks and its attention per row (lmforge.model.invariant), quantized layers keep every decode row on
one kernel path (quant.policy.cover_rows), and prefill chunks sit on a grid counted from the prompt's first
token, so a prompt's numbers never depend on the batch nor on a reused prefix (docs/serving.md, "Guarantees").

Each row samples on its own (`RowSampler`): its temperature / top-k / top-p / min-p / repetition penalty, and
its own torch.Generator when seeded, so a seeded row draws the same tokens whatever else is in the batch.

A batch of one row (a single client, or the tail of a burst) has a shape that stays put, so its steps can run the
static decode step traced with torch.jit.trace (no Python per op) when the DecodeRuntime's rule says the trace pays
for itself. Its cache is then kept at a length that is a multiple of CACHE_BUCKET, so one trace serves every step
of that length. Batches of several rows run `Transformer.decode_hidden` eagerly: their shape changes as rows come
and go.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmforge.decoding.constraints import Matcher
from lmforge.decoding.sampling import GenerationConfig, apply_repetition_penalty, next_token
from lmforge.decoding.step import DecodeOptions, DecodeRuntime, cache_bucket, hooked, static_step_unsupported
from lmforge.errors import GenerationError
from lmforge.model.cache import KVCache, StaticKV
from lmforge.model.invariant import set_batch_invariant
from lmforge.model.layers import Attention
from lmforge.model.multi_lora import AdapterRef, AdapterRows
from lmforge.quant.policy import cover_rows
from lmforge.serve.chunks import ChunkSchedule
from lmforge.serve.prefix_cache import PrefixCache
from lmforge.serve.row_group import RowGroup

log = logging.getLogger("lmforge.serve")

DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per prefill forward (the server's --prefill-chunk): docs/serving.md
PREFIX_GRAIN = 16  # the chunk grid's step for prompts shorter than a chunk (BatchDecoder prefix_grain): docs/serving.md
MAX_GROUPS = 4  # row groups of a batch (RowGroup): each further one costs one more model call per decode step


def row_seed(seed: int, index: int) -> int:
    """Choice `index` of a seeded request: choice 0 uses the seed itself (as `lmforge generate --seed`)."""
    return seed if index == 0 else hash((seed, index)) & ((1 << 63) - 1)


class RowSampler:
    """One row's logits processing and sampling: what stream_tokens does for a batch of one."""

    def __init__(self, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, prompt_ids: list[int] | None = None,
                 vocab_size: int = 0, device=None, constraint: Matcher | None = None) -> None:
        """constraint: this row's matcher (decoding.constraints): its mask is applied last, and it is advanced with
        each token drawn here."""
        self.constraint = constraint
        self.gc = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repetition_penalty=repetition_penalty)
        self.gen = torch.Generator(device=device or "cpu").manual_seed(seed) if seed is not None else None
        self.seen = None  # (1, V) bool: tokens of the prompt and output, for the repetition penalty
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(prompt_ids or [], dtype=torch.long, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        """argmax of the raw logits: the engine may take it from one batched argmax."""
        return self.gc.temperature == 0.0 and self.seen is None and self.constraint is None

    @property
    def greedy(self) -> bool:
        """argmax of the logits once the constraint's mask is on them (the engine's batched, masked argmax)."""
        return self.gc.temperature == 0.0 and self.seen is None

    def __call__(self, logits: torch.Tensor, masked: bool = False, argmax: int | None = None) -> int:
        """logits (1, V) raw float32 -> the next token id. masked: the constraint's mask is on them already (the
        engine's BatchMasker); argmax: their argmax, taken batched, which a `greedy` row uses as its token."""
        if argmax is not None and self.greedy:
            tok = torch.tensor([argmax])  # (1,)
        else:
            if self.seen is not None:
                logits = apply_repetition_penalty(logits, self.seen, self.gc.repetition_penalty)
            if self.constraint is not None and not masked:
                logits = self.constraint.apply(logits)  # (1, V): disallowed tokens at -inf
            tok = next_token(logits, self.gc, self.gen)  # (1,)
        if self.seen is not None:
            self.seen[0, tok] = True
        if self.constraint is not None:
            self.constraint.advance(int(tok[0]))
            self.constraint.prefetch()  # the next mask, on the mask thread while the model runs the next step
        return int(tok[0])


@dataclass(eq=False)
class PrefillJob:
    """A prompt being prefilled alone, a chunk per call of `BatchDecoder.prefill_chunk` (the scheduler runs decode
    steps of the running rows between chunks, so a long prompt holds none of them for more than a chunk)."""

    ids: list[int]
    cache: KVCache  # (1, ...) with room for the prompt; `cache.length` tokens done
    adapter: AdapterRef | None
    reused: int  # tokens taken from the prefix cache
    logits: torch.Tensor | None = None  # (1, V) float32 once the last chunk ran


def _unwritten_cache(cfg, max_len: int, device, dtype) -> KVCache:
    """A batch-1 prefill cache left unwritten (torch.empty; KVCache zeroes its tensors): a long prompt's cache is
    hundreds of MB, and zeroing it (page faults included) when the prompt arrived held the running rows for a good
    part of a chunk's time. The chunks write its columns before anything reads them (attention reads only the
    columns up to the chunk's end), and `prefill_chunk` zeroes the room past the prompt after the last one."""
    shape = (1, cfg.n_kv_heads, max_len, cfg.head_dim)
    k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
    v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
    return KVCache.from_tensors(k, v, 0)


def _attentions(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class BatchDecoder:
    """The running batch: its rows (addressed by index 0..rows-1, in the order they joined) in row groups, each
    with its KV cache, attention mask and positions (serve/row_group.py)."""

    def __init__(self, model, prefix_cache: PrefixCache | None = None, headroom: int = 64,
                 compile: str = "auto", runtime: DecodeRuntime | None = None, lora: AdapterRows | None = None,
                 invariant: bool = False, prefill_chunk: int = 0, max_rows: int = 64, group_pad: int = 4096,
                 prefix_grain: int = PREFIX_GRAIN) -> None:
        """compile: the batch-1 step. "trace": the traced static step; "auto": that, once the runtime's rule says
        a trace pays for itself; "off": always eager. runtime: the model's DecodeRuntime to share (its traces and
        step counts), e.g. the Generator's; None builds one. lora: the model's multi-LoRA row slots
        (lmforge.model.multi_lora), set before each model call from the rows' adapters.
        invariant: batch-invariant decode steps (lmforge.model.invariant, quant.policy.cover_rows) for up to
        max_rows rows, and prefills on the chunk grid (see `PrefillJob`); prefill_chunk: tokens per prefill
        forward (0: a prompt in one forward). prefix_grain: in invariant mode a prompt shorter than one chunk runs
        in pieces of this many tokens (when it divides prefill_chunk), so that short prompts reuse each other's
        prefixes (`grid`).
        group_pad: the padding columns a joining row may add to a group's cache before it starts a group of its
        own (`join`)."""
        if prefill_chunk < 0:
            raise GenerationError(f"BatchDecoder prefill_chunk must be >= 0, got {prefill_chunk}")
        self.model, self.prefix_cache, self.headroom, self.group_pad = model, prefix_cache, headroom, group_pad
        self.device = next(model.parameters()).device
        if invariant and self.device.type != "cpu":  # GPU kernels pick their own reduction orders: not covered
            log.info("batch invariance is for CPU decoding; %s runs without it", self.device)
            invariant = False
        self.invariant, self.chunk = invariant, prefill_chunk
        self.schedule = ChunkSchedule(model.cfg, prefill_chunk) if prefill_chunk else None  # long prompts' chunk ends
        fine = 0 < prefix_grain < prefill_chunk and prefill_chunk % prefix_grain == 0
        self.grain = prefix_grain if fine else prefill_chunk  # the grid's step for prompts shorter than a chunk
        set_batch_invariant(model, invariant, max_rows=max(64, max_rows))
        if invariant:
            cover_rows(model, max_rows)
        self.lora = lora
        self.runtime = runtime if runtime is not None else DecodeRuntime(model)
        if self.runtime.model is not model:
            raise GenerationError("BatchDecoder: the runtime belongs to another model")
        self.dtype = next(model.parameters()).dtype
        if compile not in ("auto", "trace", "off"):
            raise GenerationError(f"BatchDecoder compile: {compile!r} is not one of auto | trace | off")
        self.compile = compile
        why = static_step_unsupported(model)
        self.static_ok = compile != "off" and why is None
        self.batched_ok = why is None  # untraced steps: decode_hidden, eagerly (compile "off" included)
        if invariant and self.static_ok and not all(a.one_pass_capable(self.dtype) for a in _attentions(model)):
            self.static_ok = False  # the per-row attention of invariant steps reads Python ints: no trace of it
        self.path = "eager" if why is None else f"eager ({why})"  # what batch-1 steps ran last, and why
        self.reset()

    def reset(self) -> None:
        self.groups: list[RowGroup] = []  # rows of similar lengths, each group one left-padded cache
        self._order: list[int] = []  # row ids in the batch's order (row b of step's logits is _order[b])
        self._next_id = 0
        self._lora_rows(None)

    @property
    def rows(self) -> int:
        return len(self._order)

    def _locate(self, b: int) -> tuple[RowGroup, int]:
        """Row b's group and its index there."""
        rid = self._order[b]
        g = next(g for g in self.groups if rid in g.ids)
        return g, g.ids.index(rid)

    def _lora_rows(self, adapters: list[AdapterRef | None] | None) -> bool:
        """The next model call's rows run these adapters (None: every row the base); True when any has one. Reset
        to None after each call, so other work on this thread (scoring) runs the base."""
        if self.lora is None:
            return False
        return self.lora.use(None if adapters is None else [0 if a is None else a.slot for a in adapters])

    def row_ns(self, b: int) -> int | None:
        """Row b's prefix-cache namespace: its adapter's load key (None: the base)."""
        g, j = self._locate(b)
        a = g.adapters[j]
        return None if a is None else a.key

    @property
    def width(self) -> int:
        """The widest group's cache columns (padding included)."""
        return max((g.width for g in self.groups), default=0)

    # ---- joining ------------------------------------------------------------------------------------------
    @property
    def reuse_exact(self) -> bool:
        """Whether prefix-cache entries hold only what a fresh prefill computes (the chunk grid's prompt columns):
        invariant mode with chunked prefill. Invariant without chunks: the cache is not used at all."""
        return self.invariant and self.chunk > 0

    def begin_prefill(self, prompt_ids: list[int], adapter: AdapterRef | None = None) -> PrefillJob:
        """A prompt to prefill alone (with its LoRA adapter), its prefix taken from the prefix cache where one
        matches: in invariant mode only a prefix that ends on the chunk grid, and none without chunks."""
        n = len(prompt_ids)  # room past the prompt: a row that starts a group decodes in this cache (RowGroup.join)
        cache = _unwritten_cache(self.model.cfg, n + self.headroom, self.device, self.dtype)
        hit = None
        if self.prefix_cache is not None and (self.reuse_exact or not self.invariant):
            hit = self.prefix_cache.lookup(prompt_ids, self.cache_ns(adapter, n),
                                           floor=self._floor(n) if self.invariant else None)
        m = 0
        if hit is not None:
            m, k, v = hit
            for i in range(len(cache.k)):
                cache.k[i][0, :, :m] = k[i]
                cache.v[i][0, :, :m] = v[i]
            cache.length = m
        return PrefillJob(list(prompt_ids), cache, adapter, m)

    def grid(self, n: int) -> int:
        """The invariant chunk grid's step for a prompt of n tokens: `prefix_grain` below one chunk, else the chunk
        (whose ends then follow `schedule`: chunk-sized steps, shorter ones further in). A prompt's chunks end on
        the grid, so a cached prefix ending on it is what a fresh prefill makes, given the same grid: entries are
        kept apart by grid (`cache_ns`), and a long prompt's first chunk is one call (its prefill is not slowed,
        nor the running rows held longer, by the short prompts' pieces)."""
        return self.grain if n < self.chunk else self.chunk

    def _floor(self, n: int):
        """m -> the last chunk end at or before m on the grid of a prompt of n tokens (prefix lookups)."""
        if n < self.chunk:
            return lambda m: m - m % self.grain
        return self.schedule.floor

    def cache_ns(self, adapter: AdapterRef | None, n: int) -> object:
        """The prefix-cache namespace of a prompt of n tokens: its adapter's load key (None: the base), and in
        invariant mode its grid (entries of one grid never serve a prompt on the other)."""
        key = None if adapter is None else adapter.key
        return (key, self.grid(n)) if self.reuse_exact and self.grain != self.chunk else key

    def next_chunk(self, job: PrefillJob) -> int:
        """Tokens the job's next `prefill_chunk` call runs: up to the next chunk end of `schedule` for a prompt of
        a chunk or more, else up to the next `prefix_grain` step in invariant mode."""
        start, n = job.cache.length, len(job.ids)
        if not self.chunk:
            return n - start
        if n >= self.chunk:
            return self.schedule.next_end(start, n) - start
        if not self.invariant:
            return min(n, start + self.chunk) - start
        return min(n, (start // self.grain + 1) * self.grain) - start

    @torch.inference_mode()
    def prefill_chunk(self, job: PrefillJob) -> int:
        """Run the job's next chunk -> its tokens. Chunks end on multiples of `prefill_chunk` counted from the
        prompt's start in invariant mode (so a fresh prefill and one after a reused prefix run the same calls),
        else `prefill_chunk` tokens from where the last one stopped; after the last one `job.logits` is set."""
        start = job.cache.length
        end = start + self.next_chunk(job)
        n = len(job.ids)
        ids = torch.tensor([job.ids[start:end]], dtype=torch.long, device=self.device)  # (1, end - start)
        self._lora_rows([job.adapter])
        try:
            h = self.model(ids, cache=job.cache)  # (1, T, D); positions start.., causal over the earlier columns
        finally:
            self._lora_rows(None)
        if end == n:
            job.logits = self.model.lm_logits(h[:, -1]).float()  # (1, V)
            for t in (*job.cache.k, *job.cache.v):  # the room past the prompt: zeros, as in a KVCache
                t.narrow(2, n, t.shape[2] - n).zero_()  # (1, n_kv, max_len - n, hd)
        return end - start

    def prefill(self, prompt_ids: list[int], adapter: AdapterRef | None = None) -> tuple[KVCache, torch.Tensor, int]:
        """Run one prompt alone (with its LoRA adapter), all its chunks -> (its cache, last logits (1, V) float32,
        tokens taken from the prefix cache)."""
        job = self.begin_prefill(prompt_ids, adapter)
        while job.logits is None:
            self.prefill_chunk(job)
        return job.cache, job.logits, job.reused

    def join(self, joiners: list[tuple[KVCache, list[int]]], adapters: list[AdapterRef | None] | None = None) -> None:
        """Append prefilled rows (batch-1 caches full of their prompts) after the running ones; adapters: each
        joiner's LoRA adapter (None: all the base). Each joins the group where it adds the least padding, or a new
        group where that padding would exceed both the group's real columns and `group_pad` (a long prompt among
        short rows): one copy per group that takes rows, none for a lone row starting a group."""
        if not joiners:
            return
        if self.static_ok:
            self.runtime.refresh()  # weights or kernel policy changed since a trace was made: retrace
        adapters = list(adapters) if adapters is not None else [None] * len(joiners)
        shape = {id(g): (g.rows, sum(g.n_real), g.width) for g in self.groups}  # rows, real columns, width
        new: list[RowGroup] = []
        take: dict[int, list[tuple[KVCache, list[int], AdapterRef | None, int]]] = {}
        for (c, ids), a in zip(joiners, adapters):
            n, best, pad = c.length, None, 0
            for g in self.groups + new:
                r, real, w = shape[id(g)]
                p = (r + 1) * max(w, n) - real - n  # padding columns of its rectangle with this row
                if best is None or p < pad:
                    best, pad = g, p
            if best is None or (pad > max(self.group_pad, shape[id(best)][1] + n)
                                and len(self.groups) + len(new) < MAX_GROUPS):
                best = RowGroup(self.device)
                new.append(best)
                shape[id(best)] = (0, 0, 0)
            r, real, w = shape[id(best)]
            shape[id(best)] = (r + 1, real + n, max(w, n))
            take.setdefault(id(best), []).append((c, list(ids), a, self._next_id))
            self._order.append(self._next_id)
            self._next_id += 1
        self.groups += new
        for g in self.groups:
            if id(g) in take:
                g.join(take[id(g)], self.headroom)

    # ---- decoding -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: list[int], steps_left: int = 0) -> torch.Tensor:
        """Feed one token per row -> next logits (B, V) float32. steps_left: how many more steps the batch may
        run (its longest row's remaining max_tokens), which decides whether a batch-1 trace pays for itself.
        One model call per group; the LM head runs once over all rows."""
        assert self.groups and len(tokens) == self.rows
        at = {rid: b for b, rid in enumerate(self._order)}
        hs, index = [], []
        for g in self.groups:
            idx = [at[rid] for rid in g.ids]
            hs.append(self._step_group(g, [tokens[b] for b in idx], steps_left))
            index += idx
        h = hs[0] if len(hs) == 1 else torch.cat(hs)  # (B, D), rows in group order
        if index != list(range(len(index))):
            inv = [0] * len(index)
            for i, b in enumerate(index):
                inv[b] = i
            h = h.index_select(0, torch.tensor(inv, device=self.device))  # (B, D) in the batch's order
        return self.model.lm_logits(h).float()  # (B, V)

    def _step_group(self, g: RowGroup, tokens: list[int], steps_left: int) -> torch.Tensor:
        """One token per row of group g -> its hidden states (Bg, D)."""
        if g.cache.length == g.cache.max_len:  # out of room: grow (copies once per `headroom` steps)
            g.resize(g.cache.max_len + max(self.headroom, g.cache.max_len // 4))
        S = g.cache.length + 1
        padded = any(n < g.cache.length for n in g.n_real)
        g.pos = g.pos + 1
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (Bg, 1)
        h = None
        lora = self._lora_rows(g.adapters)  # a captured step holds the base only: adapter rows run eagerly
        if self.rows == 1 and not padded and self.static_ok and not lora:
            if hooked(self.model):
                self.path = "eager (forward hooks are registered on the model)"
            else:
                h = self._static(g, x, steps_left)
        if h is None:
            if self.rows == 1:  # what "auto" counts towards a trace of this shape
                self.runtime.count_eager(self._key(cache_bucket(g.cache.max_len)))
            if self.batched_ok and not hooked(self.model):
                h = self._batched(g, x)
            else:
                h = self.model(x, g.mask[:, :S] if padded else None, position_ids=g.pos, cache=g.cache)[:, -1]
        self._lora_rows(None)
        for b, t in enumerate(tokens):
            g.n_real[b] += 1
            g.tokens[b].append(t)
        return h

    def _batched(self, g: RowGroup, x: torch.Tensor) -> torch.Tensor:
        """One untraced step of group g through `Transformer.decode_hidden`, run eagerly (several rows change too
        often for a trace; a lone row before its trace pays off) -> hidden (Bg, D). Its attention covers the cache's
        columns with a mask; on CPU in float32 that is lmforge's decode_attn, which skips the masked columns that the
        eager forward's SDPA would compute (see docs/benchmarks.md, serve.py)."""
        c = g.cache
        longest = max(g.n_real) + 1  # the longest row's tokens with this one (the eager forward checks this)
        if longest > self.model.cfg.context_length:
            raise GenerationError(f"sequence of {longest} tokens exceeds the model's context_length "
                                  f"{self.model.cfg.context_length}")
        col = torch.tensor([c.length], device=self.device)  # (1,): the column this token goes to
        valid = g.mask.bool() & (torch.arange(c.max_len, device=self.device) <= col)  # (Bg, max_len)
        h = self.model.decode_hidden(x, g.pos, valid, StaticKV(c.k, c.v, col))  # (Bg, D)
        c.length += 1
        return h

    def _static(self, g: RowGroup, x: torch.Tensor, steps_left: int) -> torch.Tensor | None:
        """One batch-1 step through the traced static step -> hidden (1, D); None: run the eager step instead."""
        c = g.cache
        L = cache_bucket(c.max_len)
        key = self._key(L)
        opts = DecodeOptions(self.compile)
        if self.runtime.plan(opts, key, steps_left, allow_compile=False) == "eager":
            self.path = opts.path
            if self.runtime.trace_failed:
                self.static_ok = False
            return None
        if c.max_len != L:
            g.resize(L)  # one copy of one row, then every step of this length reuses the trace
            c = g.cache
        col = torch.tensor([c.length], device=self.device)  # (1,): the column this token goes to
        valid = torch.arange(L, device=self.device)[None] <= col  # (1, L): written columns and this one
        h = self.runtime.run_traced(key, (x, g.pos, valid, col, c.k, c.v))
        if h is None:  # tracing failed (logged with its reason): eager from now on
            self.static_ok = False
            self.path = f"eager (torch.jit.trace failed: {self.runtime.trace_failed})"
            return None
        if not self.path.startswith("traced"):
            log.info("decode step: batch-1 rows run the traced static step (cache length %d)", L)
        self.path = f"traced (torch.jit.trace, {self.device.type}, cache length {L})"
        c.length += 1
        return h

    def _key(self, length: int) -> tuple:
        """The runtime's shape key of a one-row batch with a cache of `length` columns."""
        return (1, length, self.dtype, self.device)

    # ---- speculative verification of a lone row (serve/speculate.py) ------------------------------------------
    @property
    def lone(self) -> bool:
        """One row, unpadded, on the base weights: what `extend` verifies drafts for."""
        if self.rows != 1:
            return False
        g = self.groups[0]
        return g.n_real[0] == g.cache.length and g.adapters[0] is None

    @torch.inference_mode()
    def extend(self, tokens: list[int]) -> torch.Tensor:
        """Feed a `lone` row these T tokens in one forward -> float32 logits (T, V), row i what this row's one-token
        step gives after tokens[i]: each position's attention runs as that step runs it (Stepper.extend's rule:
        "static" for decode_hidden, traced or not, "eager" for the model's forward). `keep` then rolls back."""
        g = self.groups[0]
        c, T = g.cache, len(tokens)
        if c.length + T > c.max_len:  # room for the drafts (a bucket's length where the traced step reads it)
            need = c.length + T
            g.resize(cache_bucket(need) if self.static_ok else max(need, c.max_len + self.headroom))
            c = g.cache
        static = self.batched_ok and not hooked(self.model)
        x = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, T)
        # where this row's steps replay a trace, so does the verification (a trace per T and cache length, so only
        # on the steps' bucketed lengths; None: it runs eagerly)
        traced = static and self.path.startswith("traced") and c.max_len == cache_bucket(c.max_len)
        verify = getattr(self.runtime, "verify_hidden", None) if traced else None
        h = verify(c, x) if verify is not None else None  # (T, D)
        if h is None:
            c.verify_rows = "static" if static else "eager"
            try:
                h = self.model(x, cache=c)[0]  # (T, D); positions length.., no padding
            finally:
                c.verify_rows = None
        self._fed = list(tokens)
        return self.model.lm_logits(h).float()  # (T, V)

    def keep(self, n: int) -> None:
        """Of the tokens `extend` fed, the first n stay in the row (the rest's columns are left to be overwritten)."""
        g, fed = self.groups[0], self._fed
        g.cache.length -= len(fed) - n
        g.pos = g.pos + n
        g.n_real[0] += n
        g.tokens[0] += fed[:n]

    # ---- leaving ------------------------------------------------------------------------------------------
    def row_kv(self, b: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Row b's tokens and their keys/values per layer (n_kv, n, hd): views, valid until the next change."""
        g, j = self._locate(b)
        return g.row_kv(j)

    def drop(self, rows: list[int]) -> None:
        """Remove these rows (a group left empty goes away)."""
        if not rows:
            return
        gone = {self._order[b] for b in rows}
        for g in self.groups:
            g.drop([j for j, rid in enumerate(g.ids) if rid in gone])
        self.groups = [g for g in self.groups if g.rows]
        self._order = [rid for rid in self._order if rid not in gone]
