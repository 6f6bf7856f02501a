"""Autoregressive decoding with a preallocated KV cache: greedy, sampling (temperature, top-k, top-p,
min-p, repetition penalty), beam search, stop tokens, left-padded batches, and a token stream.

The per-token loop runs one forward of one new token per row; masks, positions and sampling are tensor
ops. At batch 1 on a small quantized model the Python and dispatch overhead of that forward is most of a
step, so the step can also run as one static-shape graph, traced with torch.jit.trace (captured in a fraction of a
second) or compiled with torch.compile (DecodeOptions; chosen, and every fallback to the eager step reported).
Text-level concerns (stop strings, streaming text without splitting a multi-byte character) live in TextStreamer,
on top of token ids.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoints import as_dtype, load, load_checkpoint
from lmforge.errors import GenerationError, TokenizerError
from lmforge.io import release_free_memory
from lmforge.model.layers import KVCache, StaticKV
from lmforge.model.transformer import Transformer
from lmforge.quant import DECODE_PRESETS, POLICY, decode_plan, quantize_model


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest top set whose probability reaches top_p
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in the output (the prompt may be quoted)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / generated_len ** length_penalty
    early_stopping: bool = False  # beam search: stop as soon as num_beams hypotheses are finished
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None = the model's eos ids
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise GenerationError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise GenerationError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise GenerationError("beam search with sampling is not supported: set temperature=0 or num_beams=1")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop_strings must not contain an empty string")


# ---- logits processing ---------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Divide positive, multiply negative scores (CTRL paper, as HF)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """logits (B, V); generated (B, L) output ids so far. Forbid each token that would complete an n-gram the
    output already holds: loops are cut while the prompt stays free to quote (unlike transformers)."""
    L = generated.shape[1]
    if n <= 0 or L < n:
        return logits
    windows = generated.unfold(1, n, 1)  # (B, L-n+1, n)
    prefix = generated[:, L - n + 1:]  # (B, n-1): what the next token would extend
    hit = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (B, L-n+1)
    banned = torch.zeros_like(logits).scatter_add_(1, windows[..., -1], hit.to(logits.dtype))  # (B, V)
    return logits.masked_fill(banned > 0, torch.finfo(logits.dtype).min)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k / top-p / min-p sets (in that order); (B, V) -> (B, V)."""
    neg = torch.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, neg)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # ascending
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg)
    return logits


def next_token(logits: torch.Tensor, gc: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or a sample from the filtered distribution."""
    if gc.temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits / gc.temperature, gc.top_k, gc.top_p, gc.min_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# ---- helpers ---------------------------------------------------------------------------------------
def _check(model: Transformer, input_ids: torch.Tensor, gc: GenerationConfig) -> None:
    gc.validate()
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError("empty prompt: give at least one token")
    total = input_ids.shape[1] + gc.max_new_tokens
    if total > model.cfg.context_length:
        raise GenerationError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {gc.max_new_tokens} exceeds the model's "
            f"context length {model.cfg.context_length}"
        )


def _stop_ids(model: Transformer, gc: GenerationConfig) -> list[int]:
    return list(gc.stop_token_ids) if gc.stop_token_ids is not None else model.cfg.eos_ids


# ---- the decode step: eager, or static-shape and compiled ----------------------------------------------
COMPILE_CHOICES = ("auto", "on", "trace", "off")  # DecodeOptions.compile, Generator(compile=), --compile-decode
CACHE_BUCKET = 256  # the static cache's length is rounded up to a multiple of this: few shapes, few compiles
# "auto" compiles a shape (batch, cache length) once the decode steps at that shape, those already run eagerly in
# this process plus those this run may take, reach AUTO_COMPILE_STEPS: the ski-rental rule (rent until the rent
# paid equals the price), which never spends more than twice the best choice made in hindsight. The price over the
# rent, measured on SmolLM2's default int4 path (2 cores, a loaded machine, so CPU seconds): a compile costs ~49 s
# cold and ~11 s with inductor's disk cache warm; the compiled step saves ~3-7 ms of the eager step's 21-25 ms.
# 49 s / 6 ms ~ 8,000 steps: a one-shot `generate` stays eager (also a chat whose growing history changes the
# cache length every 256 tokens); a process that keeps decoding one shape (a script's loop) compiles it.
AUTO_COMPILE_STEPS = 8192
# Below that, "auto" captures the static step with torch.jit.trace (TorchScript) once a shape has AUTO_TRACE_STEPS
# steps to run: the same ski-rental rule with a far lower price. Tracing runs the step once in Python, and the
# graph then runs without Python. Measured on SmolLM2's default int4 path with lmforge's CPU kernels (Zen 4,
# 2026-12-04): the first traced step takes ~0.12 s, the traced step 8.2 ms against the eager step's 18.8 ms
# at 2 threads (11.1 against 22 ms at 1 thread), so a trace pays for itself after ~11 steps. An earlier host with
# torch's kernels measured ~0.25 s for the trace and 4.5 ms saved per step (~55 steps): 16 keeps the rule's
# bound there (at most one trace's price lost per cache length, and the trace is kept for later generations).
AUTO_TRACE_STEPS = 16


@dataclass
class DecodeOptions:
    """How the per-token step of `stream_tokens` runs (never what it computes).

    compile: "off" runs the eager step (`Transformer.forward` on one token, the cache sliced to its length);
    "on" runs `Transformer.decode_step` (static shapes: the cache preallocated to a multiple of CACHE_BUCKET,
    written at a tensor column, attention over every column with a mask) under torch.compile (inductor,
    dynamic=False); "trace" runs the same static step as a TorchScript graph (torch.jit.trace: captured in a
    fraction of a second, no compiler, less of a gain); "auto" compiles a shape once it has AUTO_COMPILE_STEPS
    steps to run in this process, traces it once it has AUTO_TRACE_STEPS, and stays eager below. What cannot
    compile or trace (a model the static step does not cover, no C++ compiler or triton, an error) falls back to
    the eager step with a warning on stderr that says why.
    mode: torch.compile's mode; None = "reduce-overhead" (CUDA graphs) on CUDA, "default" on CPU.
    path: set by the decoder to what ran and why (`Generator.decode_step` shows the last one)."""

    compile: str = "off"
    mode: str | None = None
    path: str = ""

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise GenerationError(f"compile: {self.compile!r} is not one of {' | '.join(COMPILE_CHOICES)}")


def static_step_unsupported(model: Transformer) -> str | None:
    """Why `Transformer.decode_step` cannot stand in for the eager step of this model; None when it can.
    Not covered: encoders (bidirectional attention: they do not decode) and a model in training mode
    (dropout). Prefill and beam search (its cache rows are reordered every step) always run eagerly."""
    if not model.cfg.causal:
        return f"a {model.cfg.family} encoder (bidirectional attention)"
    if model.training:
        return "the model is in training mode (dropout)"
    if hooked(model):
        return "forward hooks are registered on the model (a captured step would skip them)"
    return None


def hooked(model: nn.Module) -> bool:
    """Whether the model itself has forward hooks (checked per step by the server, so only the top module)."""
    return bool(model._forward_pre_hooks or model._forward_hooks)


def compiler_missing(device: torch.device | str) -> str | None:
    """Why torch.compile (inductor) cannot run on `device` here, found without trying (a failed try costs
    minutes); None when it may."""
    kind = torch.device(device).type
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if kind == "cpu":
        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            return "no C++ compiler for inductor's CPU code (install g++, or set CXX)"
    elif kind == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (inductor's CUDA code needs it)"
    else:
        return f"the compiled step is built for cpu and cuda, not {kind}"
    return None


def describe_decode_step(model: Transformer, compile: str = "auto") -> str:
    """One line on the step `generate` would run for this model (what `lmforge info` prints)."""
    if compile == "off":
        return "eager (compile off)"
    if why := static_step_unsupported(model):
        return f"eager ({why})"
    if compile == "trace":
        return "static, traced with torch.jit.trace (TorchScript)"
    no_compiler = compiler_missing(next(model.parameters()).device)
    if compile == "on":
        return f"eager ({no_compiler})" if no_compiler else "static, compiled with torch.compile (inductor)"
    later = "" if no_compiler else f", compiled with torch.compile once it has {AUTO_COMPILE_STEPS}"
    return (f"static, traced with torch.jit.trace once a shape has {AUTO_TRACE_STEPS} steps to run{later} "
            "(--compile-decode auto), eager before")


def _static_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 kv: StaticKV) -> torch.Tensor:
    """The function torch.compile traces (fullgraph): `Transformer.decode_step` without its LM head, (B, D)."""
    return model.decode_hidden(tokens, positions, valid, kv)


@dataclass
class _ModelState:
    """Per model, for the life of the process: the compiled step, the shapes it traced, why it failed."""

    fn: object = None  # torch.compile(_static_step), made on first use
    mode: str | None = None
    traced: set = field(default_factory=set)  # (B, L, dtype, device) keys already compiled
    eager_steps: dict = field(default_factory=dict)  # key -> eager steps run at that shape ("auto")
    failed: str | None = None  # a compile error: not retried for this model
    pool: dict = field(default_factory=dict)  # key -> free caches whose addresses CUDA graphs recorded
    traces: dict = field(default_factory=dict)  # (key, kernel mode) -> torch.jit.trace'd static step
    trace_failed: str | None = None  # a trace error: not retried for this model
    weights: tuple = ()  # what the traces were captured from (_weights_key): they hold the tensors as constants


_STATE: weakref.WeakKeyDictionary[Transformer, _ModelState] = weakref.WeakKeyDictionary()
_log = logging.getLogger("lmforge")


def _bucket(n: int) -> int:
    return -(-n // CACHE_BUCKET) * CACHE_BUCKET


def cache_bucket(n: int) -> int:
    """The static step's cache length for n positions: n rounded up to a multiple of CACHE_BUCKET."""
    return _bucket(n)


def has_trace(model: Transformer, key: tuple) -> bool:
    """Whether the model's static step is already traced for shape `key` (B, L, dtype, device) and the current
    kernel mode (then using it costs nothing more)."""
    st = _STATE.get(model)
    return st is not None and (key, POLICY.mode) in st.traces


def trace_failure(model: Transformer) -> str | None:
    """Why tracing the model's static step failed (it is then not retried), or None."""
    st = _STATE.get(model)
    return st.trace_failed if st is not None else None


def _plan(model: Transformer, st: _ModelState, opts: DecodeOptions, key: tuple, new_steps: int) -> str:
    """"compile", "trace" or "eager": the step this batch runs; sets opts.path to what runs and why."""
    if opts.compile == "off":
        opts.path = "eager (compile off)"
        return "eager"
    want = {"on": "compile", "trace": "trace"}.get(opts.compile)
    if want is None:  # auto: the cheapest capture that pays for itself over the steps this shape has to run
        n = st.eager_steps.get(key, 0) + new_steps
        if key in st.traced or n >= AUTO_COMPILE_STEPS and not compiler_missing(key[3]) and not st.failed:
            want = "compile"
        elif n >= AUTO_TRACE_STEPS or (key, POLICY.mode) in st.traces:
            want = "trace"
        else:
            opts.path = f"eager (auto: {n} steps at this shape < {AUTO_TRACE_STEPS}, too few to pay for a capture)"
            return "eager"
    why = static_step_unsupported(model)
    if want == "compile":
        why = why or compiler_missing(key[3]) or (f"an earlier compile failed: {st.failed}" if st.failed else None)
    else:
        why = why or (f"an earlier trace failed: {st.trace_failed}" if st.trace_failed else None)
    if why:
        opts.path = f"eager ({why})"
        _log.warning("decode step: not %s, running the eager step: %s",
                     "compiled" if want == "compile" else "traced", why)
        return "eager"
    return want


def _weights_key(model: Transformer) -> tuple:
    """Identity and version of every parameter and buffer: a trace holds them as constants, so any change (a load,
    a .to(), an in-place update) must retrace. ~2 ms for SmolLM2, once per generation call (not per step)."""
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers())), POLICY.mode


def _trace_step(model: Transformer, inputs: tuple) -> torch.jit.ScriptFunction:
    """torch.jit.trace of the static step on these inputs (tokens, positions, valid, col, keys, values). Tracing
    runs the step once (so it writes the cache column, as the traced call after it does again). Parameters are
    made constants of the graph, which TorchScript allows only for tensors that do not require grad."""

    def step(tokens, positions, valid, col, ks, vs):
        return model.decode_hidden(tokens, positions, valid, StaticKV(ks, vs, col))  # (B, D)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values: the shapes are static here
            return torch.jit.trace(step, inputs, check_trace=False)
    finally:
        for p, r in flags:
            p.requires_grad_(r)


def _reason(e: BaseException) -> str:
    """The root cause of a compile error in one line (dynamo wraps the backend's error)."""
    root = getattr(e, "inner_exception", None) or e
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__


def refresh_traces(model: Transformer) -> None:
    """Forget the model's traces if its tensors changed since they were captured (they hold them as constants).
    Called when a batch starts, not per step (it walks every parameter: ~2 ms for SmolLM2)."""
    st = _STATE.setdefault(model, _ModelState())
    weights = _weights_key(model)
    if weights != st.weights:
        st.traces.clear()
        st.weights = weights


def run_traced(model: Transformer, key: tuple, inputs: tuple) -> torch.Tensor | None:
    """The static step through its torch.jit.trace for shape `key` (B, L, dtype, device): hidden states (B, D).
    The trace is made on first use from `inputs` (tokens (B, 1), positions (B, 1), valid (B, L), col (1,), keys,
    values), cached per model, shape and kernel mode. None when tracing failed for this model: the reason is
    `trace_failure(model)` and was logged, and the caller runs the eager step."""
    st = _STATE.setdefault(model, _ModelState())
    tkey = (key, POLICY.mode)
    fn = st.traces.get(tkey)
    if fn is None:
        if st.trace_failed:
            return None
        try:
            fn = st.traces[tkey] = _trace_step(model, inputs)
            release_free_memory()  # the recording's temporaries (~14 MiB for SmolLM2), back to the OS
        except Exception as e:  # noqa: BLE001 - an op the tracer refuses: report it, then decode eagerly
            st.trace_failed = _reason(e)
            _log.warning("decode step: torch.jit.trace failed, running the eager step: %s", st.trace_failed)
            return None
    with torch.jit.optimized_execution(False):  # the profiling executor's passes cost ~0.4 s, and gain ~3%
        return fn(*inputs)  # (B, D)


class _Stepper:
    """Owns the cache and mask of one batch; `step(tokens)` feeds one token per row, returns logits (B, V).

    When `opts` asks for it (see DecodeOptions), the steps run the compiled `Transformer.decode_step` over a
    cache of a bucketed length; the prefill always runs eagerly, into the same cache."""

    def __init__(self, model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new: int, opts: DecodeOptions | None = None) -> None:
        B, T = input_ids.shape
        self.model, self.T = model, T
        dev = input_ids.device
        dtype = next(model.parameters()).dtype
        self.opts = opts if opts is not None else DecodeOptions()
        self.key = (B, _bucket(T + max_new), dtype, dev)
        self.state = _STATE.setdefault(model, _ModelState())
        self.compiled = self.cudagraphs = self.traced = False
        plan = _plan(model, self.state, self.opts, self.key, max_new - 1)
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
        column written. The cache also serves the eager step, should the compile or trace fail."""
        B, L, dtype, dev = self.key
        T, st = self.T, self.state
        free = st.pool.get(self.key)
        self.cache = free.pop() if free else KVCache(self.model.cfg, B, L, device=dev, dtype=dtype)
        self.cache.length = 0
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)  # (B, L): real tokens written so far
        self.valid[:, :T] = True if attention_mask is None else attention_mask.to(dev).bool()
        self.spos = self.valid[:, :T].sum(-1, keepdim=True) - 1  # (B, 1): the last real token's position
        self.col = torch.full((1,), T - 1, dtype=torch.long, device=dev)  # (1,): the last column written
        self.kv = StaticKV(self.cache.k, self.cache.v, self.col)
        if plan == "trace":
            refresh_traces(self.model)
            self.traced = True
            self.opts.path = f"traced (torch.jit.trace, {dev.type}, cache length {L})"
            return
        if st.fn is None:
            st.mode = self.opts.mode or ("reduce-overhead" if dev.type == "cuda" else "default")
            try:
                # fullgraph: a graph break (an op dynamo cannot trace) fails the compile, and is reported, instead
                # of splitting the step into pieces that each recompile per layer
                st.fn = torch.compile(_static_step, dynamic=False, fullgraph=True, mode=st.mode)
            except Exception as e:  # noqa: BLE001 - torch too old, a bad mode, ...: report it, decode eagerly
                self._fail(e)
                return
        self.compiled = True
        self.cudagraphs = dev.type == "cuda" and "reduce-overhead" in st.mode
        if self.cudagraphs:  # CUDA graphs replay fixed addresses: pooled caches keep theirs (see close())
            for t in (*self.cache.k, *self.cache.v):
                torch._dynamo.mark_static_address(t)
        self.opts.path = f"compiled (inductor, {dev.type}, mode {st.mode}, cache length {L})"

    def _fail(self, e: BaseException) -> None:
        st = self.state
        st.failed = _reason(e)
        self.opts.path = f"eager (torch.compile failed: {st.failed})"
        _log.warning("decode step: torch.compile failed, running the eager step: %s", st.failed)
        self.compiled = self.cudagraphs = False

    def close(self) -> None:
        """Give a CUDA-graph cache back to the model's pool (the next batch of that shape reuses it)."""
        if self.cudagraphs:
            self.state.pool.setdefault(self.key, []).append(self.cache)
            self.cudagraphs = False

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids, self.mask[:, : self.T] if self.padded else None, cache=self.cache)
        return self.model.lm_logits(h[:, -1]).float()  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return self._compiled_step(tokens)
        if self.traced:
            return self._traced_step(tokens)
        st = self.state
        st.eager_steps[self.key] = st.eager_steps.get(self.key, 0) + 1
        return self._eager_step(tokens)

    def _compiled_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.col += 1
        self.spos += 1
        self.valid.index_fill_(1, self.col, True)
        st, first = self.state, self.key not in self.state.traced
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            h = st.fn(self.model, tokens[:, None], self.spos, self.valid, self.kv)  # (B, D)
        except Exception as e:  # noqa: BLE001 - any compile error: report it, then decode eagerly
            if not first:
                raise  # a traced step that fails later is a bug to see, not a fallback
            self._fail(e)  # the cache (length, the columns before it) is the eager step's as well
            return self._eager_step(tokens)
        if first:
            st.traced.add(self.key)
        self.cache.length += 1  # kept in step, so that the eager step could take over
        return self.model.lm_logits(h).float()  # (B, V); reads h before the next replay overwrites it

    def _traced_step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.col += 1
        self.spos += 1
        self.valid.index_fill_(1, self.col, True)
        st = self.state
        h = run_traced(self.model, self.key, (tokens[:, None], self.spos, self.valid, self.col, self.cache.k,
                                              self.cache.v))
        if h is None:
            self.opts.path = f"eager (torch.jit.trace failed: {st.trace_failed})"
            self.traced = False
            return self._eager_step(tokens)
        st.eager_steps[self.key] = st.eager_steps.get(self.key, 0) + 1  # uncompiled steps, for "auto"
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

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        if self.pos is not None:
            self.pos = self.pos.index_select(0, index)


# ---- sampling / greedy -----------------------------------------------------------------------------
@torch.inference_mode()
def stream_tokens(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  gc: GenerationConfig | None = None, decode: DecodeOptions | None = None,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step. A row that hit a stop id yields that id once,
    then is marked finished (later values in that row are padding to ignore). `decode` chooses the eager
    or the compiled step (default: eager) and receives in `decode.path` what ran."""
    gc = gc or GenerationConfig()
    _check(model, input_ids, gc)
    if gc.num_beams > 1:
        raise GenerationError("stream_tokens does not do beam search; use beam_search()")
    gen = None
    if gc.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(gc.seed)
    stop = torch.tensor(_stop_ids(model, gc), dtype=torch.long, device=input_ids.device)
    stepper = _Stepper(model, input_ids, attention_mask, gc.max_new_tokens, decode)
    try:
        yield from _sample_loop(model, input_ids, attention_mask, gc, gen, stop, stepper)
    finally:
        stepper.close()


def _sample_loop(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 gc: GenerationConfig, gen: torch.Generator | None, stop: torch.Tensor, stepper: _Stepper
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    B = input_ids.shape[0]
    seen = None
    if gc.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=input_ids.device)
        real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
        rows, cols = (real >= 0).nonzero(as_tuple=True)
        seen[rows, real[rows, cols]] = True
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = input_ids.new_empty(B, 0)  # (B, i): the output so far, for no_repeat_ngram_size
    logits = stepper.prefill(input_ids)
    for i in range(gc.max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, out, gc.no_repeat_ngram_size)
        tok = next_token(logits, gc, gen)  # (B,)
        if stop.numel():
            tok = torch.where(finished, stop[0], tok)
        if seen is not None:
            seen[torch.arange(B, device=seen.device), tok] = True
        newly = torch.isin(tok, stop) if stop.numel() else torch.zeros_like(finished)
        if gc.no_repeat_ngram_size:
            out = torch.cat([out, tok[:, None]], 1)
        yield tok, finished.clone()
        finished = finished | newly
        if i == gc.max_new_tokens - 1 or bool(finished.all()):
            return
        logits = stepper.step(tok)


def generate(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             gc: GenerationConfig | None = None, decode: DecodeOptions | None = None) -> list[list[int]]:
    """New token ids per row (the stop id included when one ended the row; nothing after it)."""
    gc = gc or GenerationConfig()
    if gc.num_beams > 1:
        if decode is not None:
            decode.path = "eager (beam search reorders the cache every step)"
        return beam_search(model, input_ids, attention_mask, gc)
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for tok, done in stream_tokens(model, input_ids, attention_mask, gc, decode):
        for b, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
            if not d:
                out[b].append(t)
    return out


def greedy(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
           attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None,
           decode: DecodeOptions | None = None) -> torch.Tensor:
    """Greedy decoding, returns (B, T + new) like transformers' generate (finished rows padded with eos)."""
    gc = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=eos_ids or [])
    steps = [tok for tok, _ in stream_tokens(model, input_ids, attention_mask, gc, decode)]
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


# ---- beam search -----------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                gc: GenerationConfig | None = None) -> list[list[int]]:
    """Beam search with transformers' semantics (length penalty on the generated length, its early-stop
    heuristic), so the same ids come out. Returns the best hypothesis' new tokens per row."""
    gc = gc or GenerationConfig(num_beams=4)
    _check(model, input_ids, gc)
    B, T = input_ids.shape
    nb, dev = gc.num_beams, input_ids.device
    stop = torch.tensor(_stop_ids(model, gc), dtype=torch.long, device=dev)
    keep = max(2, 1 + stop.numel()) * nb  # candidates per row, so nb survive even if some finish
    top_nb = torch.arange(keep, device=dev) < nb  # (K,)
    NEG = -1.0e9

    ids = input_ids.repeat_interleave(nb, 0)  # (B*nb, T)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, 0)
    stepper = _Stepper(model, ids, mask, gc.max_new_tokens)
    max_new = gc.max_new_tokens
    run_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)  # generated tokens of running beams
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first one may expand at step 0
    fin_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_score = torch.full((B, nb), NEG, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    seen = None
    if gc.repetition_penalty != 1.0:
        seen = torch.zeros(B * nb, model.cfg.vocab_size, dtype=torch.bool, device=dev)
        real = ids if mask is None else ids.masked_fill(mask == 0, -1)
        rows, cols = (real >= 0).nonzero(as_tuple=True)
        seen[rows, real[rows, cols]] = True

    logits = stepper.prefill(ids)  # (B*nb, V)
    V = logits.shape[-1]
    batch_off = (torch.arange(B, device=dev) * nb)[:, None]  # (B, 1)
    for step in range(max_new):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, run_seq.view(B * nb, max_new)[:, :step], gc.no_repeat_ngram_size)
        logp = logits.log_softmax(-1).view(B, nb, V) + run_score[:, :, None]  # (B, nb, V)
        cand_score, cand_idx = torch.topk(logp.view(B, nb * V), keep)  # (B, K)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V  # (B, K)
        cand_seq = run_seq.gather(1, cand_beam[:, :, None].expand(B, keep, max_new)).clone()  # (B, K, L)
        cand_seq[:, :, step] = cand_tok
        last = step == max_new - 1
        hits = torch.isin(cand_tok, stop) if stop.numel() else torch.zeros_like(cand_tok, dtype=torch.bool)
        if last:
            hits = torch.ones_like(hits)  # max length reached: every candidate is final
        # running beams for the next step: the best nb candidates that did not finish
        run_cand = cand_score + hits.float() * NEG
        nxt = torch.topk(run_cand, nb).indices  # (B, nb)
        run_seq = cand_seq.gather(1, nxt[:, :, None].expand(B, nb, max_new))
        run_score = run_cand.gather(1, nxt)
        src_beam = (cand_beam.gather(1, nxt) + batch_off).view(-1)  # (B*nb,) rows of the cache to keep
        # finished hypotheses: candidates among the top nb that hit a stop, scored with the length penalty
        just_done = hits & top_nb[None, :]
        fscore = cand_score / float(step + 1) ** gc.length_penalty
        full = fin_done.all(-1, keepdim=True) & gc.early_stopping
        fscore = fscore + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
        m_seq = torch.cat([fin_seq, cand_seq], 1)
        m_score = torch.cat([fin_score, fscore], 1)
        m_len = torch.cat([fin_len, torch.full_like(cand_tok, step + 1)], 1)
        m_done = torch.cat([fin_done, just_done], 1)
        best = torch.topk(m_score, nb).indices  # (B, nb)
        fin_seq = m_seq.gather(1, best[:, :, None].expand(B, nb, max_new))
        fin_score, fin_len, fin_done = m_score.gather(1, best), m_len.gather(1, best), m_done.gather(1, best)
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        best_possible = run_score[:, :1] / float(step + 1) ** gc.length_penalty
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True).values, torch.full_like(fin_score, NEG))
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if last or not bool(improvable.any()) or (gc.early_stopping and bool(fin_done.all())) or bool(hits.all()):
            break
        stepper.reorder(src_beam)
        if seen is not None:
            seen = seen.index_select(0, src_beam)
            seen[torch.arange(B * nb, device=seen.device), run_seq[:, :, step].reshape(-1)] = True
        logits = stepper.step(run_seq[:, :, step].reshape(-1))
    return [fin_seq[b, 0, : int(fin_len[b, 0])].tolist() for b in range(B)]


# ---- text streaming ---------------------------------------------------------------------------------
class TextStreamer:
    """Turns a growing list of token ids into text pieces: never splits a multi-byte character (a piece
    ending in U+FFFD waits for the next token) and holds back text that may be the start of a stop string."""

    def __init__(self, decode, stop_strings: list[str] | None = None) -> None:
        self.decode = decode  # list[int] -> str
        self.stop_strings = list(stop_strings or [])
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already given out
        self.stopped = False

    def put(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (may be '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for its remaining bytes
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            piece, self.emitted = text[self.emitted:cut], cut
            return piece
        safe = len(text) - self._held(text)
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def end(self) -> str:
        """Flush what was held back at the end of generation."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self.stop_strings if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held


# ---- text in, text out --------------------------------------------------------------------------------
class Generator:
    """Text in, text out: tokenization, chat templates, stop strings and streaming around the decoders above.
    The one engine that the CLI, the server and the tasks use."""

    def __init__(self, model: Transformer, tokenizer, name: str = "", compile: str = "auto") -> None:
        if tokenizer is None:
            raise TokenizerError(f"{name or 'model'}: no tokenizer found, cannot generate text")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.compile = DecodeOptions(compile).compile  # checked; a per-call compile=... overrides it
        self.decode_step = "eager (nothing decoded yet)"  # what the last call ran, and why (DecodeOptions.path)

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
             quantize: int | str | None = "auto", compile: str = "auto") -> Generator:
        """quantize="auto": a quantized GGUF decodes on the int4/int8 path matching each tensor's type (exact for
        Q4_0/Q4_1/Q4_K blocks); other checkpoints in float. "none" / None, or an explicit dtype with "auto":
        full precision. 8 or 4: quantize the float weights with DECODE_PRESETS. compile: the decode step,
        "auto" | "on" | "off" (see DecodeOptions: "auto" compiles a shape once it has enough steps to run).
        device: "cpu", "cuda[:N]" or "auto". The int4/int8 kernels are CPU code, so on a GPU "auto" loads the
        dequantized weights, in bfloat16 unless `dtype` says otherwise (lmforge.device.inference_dtype)."""
        from lmforge.device import resolve_device

        dev = resolve_device(device, "device")
        mode, dtype = decode_plan(quantize, dtype, dev)
        device = str(dev)
        if mode == "auto":
            ck = load_checkpoint(name_or_path, dtype=as_dtype(dtype), device=device, quantized=True)
            model, tok = ck.model, ck.tokenizer
        else:
            model, tok = load(name_or_path, dtype=dtype, device=device)
        if isinstance(mode, int):
            model = quantize_model(model, **DECODE_PRESETS[mode])
        return cls(model, tok, str(name_or_path), compile=compile)

    @property
    def runs_on(self) -> str:
        """Where and in what the model decodes, e.g. "cpu, int4 weights" or "cuda:0, bfloat16 weights"."""
        from lmforge.quant import QuantLinear

        p = next(self.model.parameters())
        bits = sorted({m.bits for m in self.model.modules() if isinstance(m, QuantLinear)})
        kind = "/".join(f"int{b}" for b in bits) if bits else str(p.dtype).removeprefix("torch.")
        return f"{p.device}, {kind} weights"

    # -- prompts
    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template, or a plain instruction format for base models without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        parts = []
        for m in messages:
            role = m.get("role", "user")
            parts.append(m["content"].strip() if role in ("user", "system") else f"Response: {m['content'].strip()}")
        return "\n\n".join(parts) + ("\n\nResponse:" if add_generation_prompt else "")

    def _encode(self, prompts: list[str], add_special_tokens: bool, max_new_tokens: int,
                truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> left-padded (B, T) ids and mask, leaving room for max_new_tokens in the context."""
        if any(not p.strip() for p in prompts):
            raise GenerationError("empty prompt: give some text")
        ids = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        room = self.model.cfg.context_length - max_new_tokens
        if room <= 0:
            raise GenerationError(f"max_new_tokens {max_new_tokens} leaves no room in the context length "
                                  f"{self.model.cfg.context_length}")
        for i, row in enumerate(ids):
            if len(row) > room:
                if not truncate:
                    raise GenerationError(
                        f"prompt of {len(row)} tokens + max_new_tokens {max_new_tokens} exceeds the context length "
                        f"{self.model.cfg.context_length} (shorten it, or pass truncate=True / --truncate to keep "
                        "its last tokens)")
                logging.getLogger("lmforge").warning("prompt %d truncated from %d to its last %d tokens", i,
                                                     len(row), room)
                ids[i] = row[-room:]
        T = max(map(len, ids))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        dev = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in ids], device=dev)  # (B, T) left padding
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids], device=dev)  # (B, T)
        return input_ids, mask

    def _decode_options(self, compile: str | None) -> DecodeOptions:
        return DecodeOptions(self.compile if compile is None else compile)

    def _streamer(self, gc: GenerationConfig) -> TextStreamer:
        return TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)

    def stream(self, prompt: str, *, chat: bool = False, add_special_tokens: bool | None = None,
               truncate: bool = False, compile: str | None = None, **gen) -> Iterator[str]:
        """Yield text pieces as they are decoded (never half a character; stop strings are cut).
        compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's)."""
        opts = self._decode_options(compile)
        gc = GenerationConfig(**gen)
        gc.validate()
        text = self.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode([text], special, gc.max_new_tokens, truncate)
        streamer = self._streamer(gc)
        stop = set(_stop_ids(self.model, gc))
        for tok, done in stream_tokens(self.model, ids, mask, gc, opts):
            self.decode_step = opts.path  # set once the stepper is built; a failed compile changes it
            t = int(tok[0])
            if bool(done[0]) or t in stop:
                break
            piece = streamer.put(t)
            if piece:
                yield piece
            if streamer.stopped:
                return
        tail = streamer.end()
        if tail:
            yield tail

    def generate(self, prompt: str | list[str], *, chat: bool = False, add_special_tokens: bool | None = None,
                 truncate: bool = False, compile: str | None = None, **gen) -> str | list[str]:
        """Complete one prompt (-> str) or a batch (-> list[str], left-padded together).
        compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's)."""
        opts = self._decode_options(compile)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        gc = GenerationConfig(**gen)
        gc.validate()
        texts = [self.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode(texts, special, gc.max_new_tokens, truncate)
        stop = set(_stop_ids(self.model, gc))
        outs = []
        rows = generate(self.model, ids, mask, gc, opts)
        self.decode_step = opts.path
        for row in rows:
            row = row[:-1] if row and row[-1] in stop else row
            st = self._streamer(gc)
            outs.append("".join(st.put(t) for t in row) + st.end())
        return outs[0] if single else outs

    def chat(self, messages: list[dict[str, str]], **gen) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        gen.setdefault("max_new_tokens", 256)
        return self.generate(self.format_chat(messages), add_special_tokens=False, **gen)

    def chat_stream(self, messages: list[dict[str, str]], **gen) -> Iterator[str]:
        gen.setdefault("max_new_tokens", 256)
        prompt = self.format_chat(messages)
        yield from self.stream(prompt, add_special_tokens=False, **gen)
