"""The decode runtime: how each decode step runs (eager, traced with torch.jit.trace, or compiled with
torch.compile), chosen by one rule that the single-stream decoder and the server's batch decoder both ask.

A `DecodeRuntime` belongs to one model and owns what it captured (traces, the compiled step, CUDA-graph caches)
and the step counts its "auto" rule reads. There is no module-level state: whoever decodes holds a runtime
(`Generator.runtime`, the server's scheduler) and passes it on; a bare call builds a fresh one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmforge.device import inference_dtype
from lmforge.errors import GenerationError
from lmforge.io import release_free_memory
from lmforge.model.cache import KVCache, StaticKV, VerifyKV
from lmforge.model.invariant import invariance_key
from lmforge.model.layers import Attention
from lmforge.quant import QuantError, kernel_policy

COMPILE_CHOICES = ("auto", "on", "trace", "off")  # DecodeOptions.compile, Generator(compile=), --compile-decode
CACHE_BUCKET = 256  # the static cache's length is rounded up to a multiple of this: few shapes, few captures
# "auto" captures a shape (batch, cache length) once the steps at that shape, those already run eagerly plus those
# this call may take, reach the capture's price in saved step time: the ski-rental rule (rent until the rent paid
# equals the price), never more than twice the best choice in hindsight. A torch.compile costs tens of seconds
# and a trace a fraction of one, against milliseconds saved per step (the measured prices: docs/benchmarks.md).
AUTO_COMPILE_STEPS = 8192
AUTO_TRACE_STEPS = 16
# a speculative verification of T rows is traced (per T and cache length) by the same rule, once those already run
# eagerly at its shape plus those the call may still make reach this many (its trace costs about what this many
# save over the eager forward; docs/benchmarks.md)
AUTO_TRACE_VERIFICATIONS = 32

_log = logging.getLogger("lmforge")


# ---- which weights decode: the load-time choice (Generator.load, `lmforge info`) -----------------------------
QUANTIZE_CHOICES = ("auto", "none", "8", "4")  # what --quantize / Generator.load(quantize=...) accept


def decode_quantize(quantize: int | str | None, dtype_given: bool = False) -> int | str:
    """Normalise a quantize setting to "auto", "none", 8 or 4. "auto" (the CLI/Generator default): a GGUF with
    quantized matrices decodes on the matching int4/int8 path, anything else in float; an explicit dtype turns
    "auto" into "none" (`--dtype float32` asks for full precision). None means "none" (the old API default)."""
    q = "none" if quantize is None else str(quantize).lower()
    if q not in QUANTIZE_CHOICES:
        raise QuantError(f"quantize: {quantize!r} is not one of {' | '.join(QUANTIZE_CHOICES)}")
    if q == "auto" and dtype_given:
        return "none"
    return int(q) if q.isdigit() else q


def decode_plan(quantize: int | str | None, dtype: torch.dtype | str | None,
                device: torch.device) -> tuple[int | str, torch.dtype | str]:
    """(quantize mode, weight dtype) that Generator.load uses on `device`, and that `lmforge info` reports.
    The int4/int8 kernels are CPU code, so on a GPU "auto" means the dequantized weights, in bfloat16 where the
    GPU has it (lmforge.device.inference_dtype); on the CPU the float weights load in float32."""
    mode = decode_quantize(quantize, dtype_given=dtype is not None)
    if mode == "auto" and device.type != "cpu":
        mode = "none"
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else inference_dtype(device)
    return mode, dtype


def cache_bucket(n: int, bucket: int = CACHE_BUCKET) -> int:
    """The static step's cache length for n positions: n rounded up to a multiple of `bucket`."""
    return -(-n // bucket) * bucket


@dataclass
class DecodeOptions:
    """How one call's per-token step runs (never what it computes).

    compile: "off" runs the eager step (`Transformer.forward` on one token, the cache sliced to its length);
    "on" runs `Transformer.decode_hidden` (static shapes: the cache preallocated to a multiple of CACHE_BUCKET,
    written at a tensor column, attention over every column with a mask) under torch.compile; "trace" runs the
    same static step as a TorchScript graph (torch.jit.trace: no compiler, a smaller gain); "auto" compiles or
    traces a shape once it has enough steps to pay for the capture (DecodeRuntime), eager before. What cannot be
    captured falls back to the eager step with a warning that says why.
    mode: torch.compile's mode; None = "reduce-overhead" (CUDA graphs) on CUDA, "default" on CPU.
    invariant: the steps must be batch-invariant (decoding/invariant.py): "auto" then only traces (inductor's
    code depends on the batch shape), and only where the per-row attention is lmforge's decode_attn; an explicit
    "on" still compiles, and its steps are not invariant.
    path: set by the decoder to what ran and why (`Generator.decode_step` shows the last one)."""

    compile: str = "off"
    mode: str | None = None
    path: str = ""
    invariant: bool = False

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise GenerationError(f"compile: {self.compile!r} is not one of {' | '.join(COMPILE_CHOICES)}")


def hooked(model: nn.Module) -> bool:
    """Whether the model itself has forward hooks (a captured step would skip them; only the top module is
    checked, since the server asks per step)."""
    return bool(model._forward_pre_hooks or model._forward_hooks)


def static_step_unsupported(model: nn.Module, mixture: Callable[[], str | None] | None = None) -> str | None:
    """Why `Transformer.decode_hidden` cannot stand in for the eager step of this model; None when it can.
    Prefill and beam search (its cache rows are reordered every step) always run eagerly. mixture: the answer of
    `mixture_uncapturable` for this model, where the caller keeps it (a walk over every expert)."""
    if not model.cfg.causal:
        return f"a {model.cfg.family} encoder (bidirectional attention)"
    if model.training:
        return "the model is in training mode (dropout)"
    if hooked(model):
        return "forward hooks are registered on the model (a captured step would skip them)"
    if model.cfg.n_experts and (why := (mixture or partial(mixture_uncapturable, model))()):
        return why
    if getattr(getattr(model, "rope", None), "switch_at", None) is not None:
        return "longrope rotary (its frequencies change with the positions; a captured step would fix them)"
    return None


def mixture_uncapturable(model: nn.Module) -> str | None:
    """A mixture's step is captured with its routing inside lmforge's moe_mm op (MoE.forward), which needs every
    expert on lmforge's int4/int8 kernels; elsewhere its routing reads Python values that a capture would fix.
    A walk over every expert of every layer: DecodeRuntime keeps the answer until its next refresh()."""
    for m in model.modules():
        if hasattr(m, "experts") and hasattr(m, "grouped"):
            if m.grouped is None or m.grouped.all_operands() is None:
                return ("a mixture of experts whose experts do not all run on lmforge's int4/int8 kernels (each "
                        "token picks its experts; a captured step would fix the choice)")
    return None


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


def describe_decode_step(model: nn.Module, compile: str = "auto", trace_after: int = AUTO_TRACE_STEPS,
                         compile_after: int = AUTO_COMPILE_STEPS) -> str:
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
    later = "" if no_compiler or model.cfg.n_experts else f", compiled with torch.compile once it has {compile_after}"
    return (f"static, traced with torch.jit.trace once a shape has {trace_after} steps to run{later} "
            "(--compile-decode auto), eager before")


def attentions(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def capture_mode(model: nn.Module) -> tuple:
    """What a trace bakes in besides the tensors: the quantized layers' kernel policy (its branch) and the
    batch-invariant row blocks (lmforge.model.invariant); a change of either retraces."""
    return kernel_policy(model), invariance_key(model)


def failure_reason(e: BaseException) -> str:
    """The root cause of a capture error in one line (dynamo wraps the backend's error)."""
    root = getattr(e, "inner_exception", None) or e
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__


def _static_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 kv: StaticKV) -> torch.Tensor:
    """The function torch.compile captures (fullgraph): `Transformer.decode_hidden`, (B, D)."""
    return model.decode_hidden(tokens, positions, valid, kv)


def _trace_step(model: nn.Module, inputs: tuple) -> torch.jit.ScriptFunction:
    """torch.jit.trace of the static step on (tokens, positions, valid, col, keys, values). Tracing runs the step
    once (it writes the cache column, as the traced call after it does again). Parameters become constants of the
    graph, which TorchScript allows only for tensors that do not require grad."""

    def step(tokens, positions, valid, col, ks, vs):
        return model.decode_hidden(tokens, positions, valid, StaticKV(ks, vs, col))  # (B, D)

    return _jit_trace(model, step, inputs)


def _jit_trace(model: nn.Module, fn, inputs: tuple) -> torch.jit.ScriptFunction:
    """torch.jit.trace of fn(*inputs) with the model's parameters held as constants."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python values: the shapes are static here
            return torch.jit.trace(fn, inputs, check_trace=False)
    finally:
        for p, r in flags:
            p.requires_grad_(r)


def verify_unsupported(model: nn.Module, cache: KVCache) -> str | None:
    """Why a speculative verification of this model over `cache` cannot run as a trace (DecodeRuntime.
    verify_hidden); None when it can: the static step's conditions, and every layer's rows on decode_attn
    (Attention._verify_rows' one-pass branch, the only one that reads no Python value of the round)."""
    if why := static_step_unsupported(model):
        return why
    cfg, ck, tok = model.cfg, cache.k[0], model.embed.tok
    act = getattr(tok, "dtype", None) or tok.weight.dtype  # a QuantEmbedding's .weight is a full dequantized copy
    if any(cfg.is_sliding(i) for i in range(cfg.n_layers)):
        return "sliding-window layers (their rows are verified by one masked attention call)"
    if ck.device.type != "cpu" or ck.dtype is not torch.float32 or act is not torch.float32:
        return "decode_attn verifies float32 rows on the CPU"
    if not all(a.one_pass_capable(ck.dtype) for a in attentions(model)):
        return "an attention layer does not run decode_attn (soft-cap, head size, or no CPU kernels)"
    return None


def _verify_forward(model: nn.Module, tokens: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor,
                    ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """`Transformer.forward` on T tokens of one unpadded row over a cache whose rows verify as the static step
    (cache.verify_rows "static"), with every value that changes per round a tensor input: tokens (1, T), the
    columns they write (T,) (their positions too), their additive masks (T, L) -> hidden (T, D) after the norm."""
    positions = cols[None]  # (1, T)
    kv = VerifyKV(ks, vs, cols, mask)
    x = model.embed(tokens, positions)  # (1, T, D)
    rope = model.rope.cos_sin(positions, x.dtype) if model.cfg.position == "rotary" else None
    for block in model.blocks:
        x = block(x, rope, None, kv)  # (1, T, D); the mask is the cache's
    if model.norm is not None:
        x = model.norm(x)
    return x[0]  # (T, D)


class DecodeRuntime:
    """One model's decode-step runtime: the plan ("eager" / "trace" / "compile") for each shape, and what it
    captured. A shape key is (batch, cache length, dtype, device). trace_after / compile_after: the "auto" rule's
    prices in steps (see AUTO_TRACE_STEPS)."""

    def __init__(self, model: nn.Module, trace_after: int = AUTO_TRACE_STEPS,
                 compile_after: int = AUTO_COMPILE_STEPS) -> None:
        if trace_after < 1 or compile_after < 1:
            raise GenerationError(f"trace_after and compile_after must be >= 1, got {trace_after}, {compile_after}")
        self.model, self.trace_after, self.compile_after = model, trace_after, compile_after
        self.compiled_fn = None  # torch.compile(_static_step), made on first use
        self.compile_mode: str | None = None
        self.compiled_keys: set[tuple] = set()  # shapes the compiled step has run
        self.compile_failed: str | None = None  # not retried
        self.eager_steps: dict[tuple, int] = {}  # shape -> uncaptured steps run at it (what "auto" counts)
        self.traces: dict[tuple, torch.jit.ScriptFunction] = {}  # (shape, kernel mode) -> traced static step
        self.trace_failed: str | None = None  # not retried
        self.pool: dict[tuple, list] = {}  # shape -> free caches whose addresses CUDA graphs recorded
        self._weights: tuple = ()  # what the traces were captured from: they hold the tensors as constants
        self.verify_failed: str | None = None  # a traced verification failed: not retried
        self.verify_after = AUTO_TRACE_VERIFICATIONS
        self._verify_why: dict[tuple, str | None] = {}  # (cache dtype, device) -> verify_unsupported's answer
        self._kernel_mode = capture_mode(model)
        self._mixture: tuple[str | None] | None = None  # mixture_uncapturable's answer, until refresh()

    # ---- the rule ----------------------------------------------------------------------------------------
    def plan(self, opts: DecodeOptions, key: tuple, new_steps: int, allow_compile: bool = True) -> str:
        """"compile", "trace" or "eager" for a run of `new_steps` steps at shape `key`; sets opts.path to what
        runs and why. allow_compile=False: only a trace may be captured (the server's changing batches)."""
        if opts.compile == "off":
            opts.path = "eager (compile off)"
            return "eager"
        # a mixture's captured step is a trace: its routing op (moe_mm) takes the experts' operands as lists that
        # only a trace holds as constants
        allow_compile = allow_compile and not opts.invariant and not self.model.cfg.n_experts
        want = {"on": "compile", "trace": "trace"}.get(opts.compile)
        if want is None:  # auto: the cheapest capture that pays for itself over the steps this shape has to run
            n = self.eager_steps.get(key, 0) + new_steps
            if allow_compile and (key in self.compiled_keys or n >= self.compile_after
                                  and not compiler_missing(key[3]) and not self.compile_failed):
                want = "compile"
            elif n >= self.trace_after or self.has_trace(key):
                want = "trace"
            else:
                opts.path = f"eager (auto: {n} steps at this shape < {self.trace_after}, too few to pay for a capture)"
                return "eager"
        why = static_step_unsupported(self.model, self._mixture_why)
        if want == "compile":
            why = why or compiler_missing(key[3]) or (
                "a mixture of experts (its step is captured by torch.jit.trace, --compile-decode trace)"
                if self.model.cfg.n_experts else None) or (
                f"an earlier compile failed: {self.compile_failed}" if self.compile_failed else None)
        else:
            why = why or (f"an earlier trace failed: {self.trace_failed}" if self.trace_failed else None)
            if opts.invariant and not why and not all(a.one_pass_capable(key[2]) for a in attentions(self.model)):
                why = "batch-invariant steps attend per row, which a trace holds only as lmforge's decode_attn"
        if why:
            opts.path = f"eager ({why})"
            # asked for by name: a warning; chosen by "auto" for a model it cannot capture: said in the path only
            log = _log.warning if opts.compile != "auto" else _log.info
            log("decode step: not %s, running the eager step: %s", "compiled" if want == "compile" else "traced", why)
            return "eager"
        return want

    def _mixture_why(self) -> str | None:
        """mixture_uncapturable(model), walked once per refresh() (plan runs per step in the server)."""
        if self._mixture is None:
            self._mixture = (mixture_uncapturable(self.model),)
        return self._mixture[0]

    def count_eager(self, key: tuple, n: int = 1) -> None:
        """Record n uncaptured steps at shape `key` (they bring "auto" closer to a capture)."""
        self.eager_steps[key] = self.eager_steps.get(key, 0) + n

    def describe(self, compile: str = "auto") -> str:
        return describe_decode_step(self.model, compile, self.trace_after, self.compile_after)

    # ---- traces ----------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget the traces if the model's tensors changed since they were captured (they hold them as constants),
        and read the capture mode (kernel policy, batch invariance: `capture_mode`) that picks among the traces.
        Once per batch, not per step: it walks every tensor."""
        weights = tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))
        if weights != self._weights:
            self.traces.clear()
        self._verify_why.clear()  # hooks, kernels or grad mode may have changed since
        self._mixture = None
        # a trace is kept per mode (its key has it): invariant and plain calls may alternate without retracing
        self._weights, self._kernel_mode = weights, capture_mode(self.model)

    def has_trace(self, key: tuple) -> bool:
        """Whether shape `key` is traced for the kernel mode seen at the last refresh (then it costs nothing)."""
        return (key, self._kernel_mode) in self.traces

    def run_traced(self, key: tuple, inputs: tuple) -> torch.Tensor | None:
        """The static step through its trace for shape `key` -> hidden (B, D); traced on first use from `inputs`
        (tokens (B, 1), positions (B, 1), valid (B, L), col (1,), keys, values). None when tracing failed (the
        reason is in `trace_failed` and was logged): the caller runs the eager step."""
        tkey = (key, self._kernel_mode)
        fn = self.traces.get(tkey)
        if fn is None:
            if self.trace_failed:
                return None
            try:
                fn = self.traces[tkey] = _trace_step(self.model, inputs)
                release_free_memory()  # the recording's temporaries, back to the OS
            except Exception as e:  # noqa: BLE001 - an op the tracer refuses: report it, then decode eagerly
                self.trace_failed = failure_reason(e)
                _log.warning("decode step: torch.jit.trace failed, running the eager step: %s", self.trace_failed)
                return None
        with torch.jit.optimized_execution(False):  # the profiling executor's passes cost more than they gain
            return fn(*inputs)  # (B, D)

    # ---- speculative verification (decoding/speculative.py) -----------------------------------------------
    def verify_hidden(self, cache: KVCache, tokens: torch.Tensor, now: bool = False,
                      ahead: int = 0) -> torch.Tensor | None:
        """T >= 2 tokens (1, T) of one unpadded row, fed at columns cache.length.. in one forward whose rows each
        give the static one-token step's numbers (Stepper.extend's "static" rows), through a trace per (T, cache
        length) -> hidden (T, D), cache.length advanced by T. The trace is made once the calls made at its shape
        plus `ahead` (those the caller may still make) reach `verify_after` (now=True: at once, for
        compile="trace"). None where it is not traced (yet), or cannot be (`verify_unsupported`, a failed trace,
        no room): the caller runs the eager forward (Stepper.extend)."""
        T, ck = tokens.shape[1], cache.k[0]
        end = cache.length + T
        if (T < 2 or end > cache.max_len or end > self.model.cfg.context_length or self.verify_failed
                or torch.is_grad_enabled()):  # decode_attn has no backward
            return None
        wkey = (ck.dtype, ck.device)
        if wkey not in self._verify_why:
            self._verify_why[wkey] = verify_unsupported(self.model, cache)
        if self._verify_why[wkey]:
            return None
        cols, mask = cache.verify_inputs(T, ck.dtype)  # (T,), (T, L)
        inputs = (tokens, cols, mask, cache.k, cache.v)
        skey = ("verify", T, ck.shape[2], ck.dtype, ck.device)
        tkey = (skey, self._kernel_mode)
        fn = self.traces.get(tkey)
        if fn is None:
            seen = self.eager_steps[skey] = self.eager_steps.get(skey, 0) + 1
            if seen + ahead < self.verify_after and not now:
                return None
            model = self.model
            try:
                fn = self.traces[tkey] = _jit_trace(model, lambda *a: _verify_forward(model, *a), inputs)
                release_free_memory()
            except Exception as e:  # noqa: BLE001 - an op the tracer refuses: verify eagerly from now on
                self.verify_failed = failure_reason(e)
                _log.warning("speculative verification: torch.jit.trace failed, running it eagerly: %s",
                             self.verify_failed)
                return None
        with torch.jit.optimized_execution(False):
            h = fn(*inputs)  # (T, D)
        cache.length = end
        return h

    # ---- the compiled step -------------------------------------------------------------------------------
    def compiled(self, mode: str | None, device: torch.device):
        """torch.compile of the static step (made once per runtime); raises what torch.compile raises."""
        if self.compiled_fn is None:
            self.compile_mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
            # fullgraph: an op dynamo cannot trace fails the compile (and is reported) instead of splitting the
            # step into pieces that each recompile per layer
            self.compiled_fn = torch.compile(_static_step, dynamic=False, fullgraph=True, mode=self.compile_mode)
        return self.compiled_fn

    def fail_compile(self, e: BaseException) -> str:
        self.compile_failed = failure_reason(e)
        _log.warning("decode step: torch.compile failed, running the eager step: %s", self.compile_failed)
        return self.compile_failed
