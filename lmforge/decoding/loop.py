"""The token loop over a left-padded batch: stream_tokens (one step at a time), generate (token ids per row) and
greedy (transformers-style (B, T + new) output). Each takes the caller's DecodeRuntime, or builds a fresh one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from lmforge.decoding.constraints import Matcher, apply_matchers
from lmforge.decoding.invariant import MAX_ROWS, InvariantStepper, invariant_decoding
from lmforge.decoding.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    check_request,
    next_tokens,
    row_generators,
    seen_tokens,
    stop_ids,
)
from lmforge.decoding.search import beam_search
from lmforge.decoding.step import DecodeOptions, DecodeRuntime
from lmforge.decoding.stepper import Stepper
from lmforge.errors import GenerationError
from lmforge.model.transformer import Transformer


@torch.inference_mode()
def stream_tokens(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  gc: GenerationConfig | None = None, decode: DecodeOptions | None = None,
                  runtime: DecodeRuntime | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step. A row that hit a stop id yields that id once, then is
    marked finished (later values in that row are padding to ignore). `decode` chooses the step (default: eager)
    and receives in `decode.path` what ran; `runtime` keeps what was captured across calls. gc.invariant (CPU,
    up to MAX_ROWS rows): each row's tokens are those it gets alone (decoding/invariant.py)."""
    gc = gc or GenerationConfig()
    check_request(model, input_ids, gc)
    if gc.num_beams > 1:
        raise GenerationError("stream_tokens does not do beam search; use beam_search()")
    B = input_ids.shape[0]
    gens = row_generators(gc, B, input_ids.device)
    stop = torch.tensor(stop_ids(model, gc), dtype=torch.long, device=input_ids.device)
    if runtime is not None and runtime.model is not model:
        raise GenerationError("stream_tokens: the DecodeRuntime belongs to another model")
    matchers = row_matchers(gc, B, stop.tolist())
    invariant = gc.invariant and input_ids.device.type == "cpu"  # GPU kernels pick their own reduction orders
    if invariant and B > MAX_ROWS:
        raise GenerationError(f"invariant decoding takes up to {MAX_ROWS} rows per call, got {B} (generate() "
                              "splits larger batches)")
    decode = decode if decode is not None else DecodeOptions()
    decode.invariant = invariant
    with invariant_decoding(model, invariant):
        make = InvariantStepper if invariant else Stepper
        stepper = make(runtime or DecodeRuntime(model), input_ids, attention_mask, gc.max_new_tokens, decode)
        try:
            yield from _sample_loop(model, input_ids, attention_mask, gc, gens, stop, stepper, matchers, invariant)
        finally:
            stepper.close()


def row_matchers(gc: GenerationConfig, B: int, stop: list[int]) -> list[Matcher | None] | None:
    """One constraint matcher per row (None: a free row) from gc.constraint; None when no row is constrained."""
    if gc.constraint is None:
        return None
    per_row = gc.constraint if isinstance(gc.constraint, (list, tuple)) else [gc.constraint] * B
    if len(per_row) != B:
        raise GenerationError(f"constraint: {len(per_row)} given for a batch of {B} rows")
    if not stop and any(c is not None for c in per_row):
        raise GenerationError("constraint: a constrained generation needs a stop token id to end on")
    return [c.matcher(stop) if c is not None else None for c in per_row]


def _sample_loop(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 gc: GenerationConfig, gens: list[torch.Generator | None], stop: torch.Tensor, stepper: Stepper,
                 matchers: list[Matcher | None] | None = None, invariant: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    B = input_ids.shape[0]
    seen = seen_tokens(input_ids, attention_mask, model.cfg.vocab_size) if gc.repetition_penalty != 1.0 else None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = input_ids.new_empty(B, 0)  # (B, i): the output so far, for no_repeat_ngram_size
    logits = stepper.prefill(input_ids)
    for i in range(gc.max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, out, gc.no_repeat_ngram_size)
        if matchers is not None:  # last, so no processor can bring a disallowed token back
            logits = apply_matchers(logits, [None if d else m for m, d in zip(matchers, finished.tolist())])
        tok = next_tokens(logits, gc, gens, per_row=invariant)  # (B,)
        if stop.numel():
            tok = torch.where(finished, stop[0], tok)
        if matchers is not None:
            for m, t, d in zip(matchers, tok.tolist(), finished.tolist()):
                if m is not None and not d:
                    m.advance(t)
                    m.prefetch()  # the next mask, computed while the model runs the step below
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
             gc: GenerationConfig | None = None, decode: DecodeOptions | None = None,
             runtime: DecodeRuntime | None = None) -> list[list[int]]:
    """New token ids per row (the stop id included when one ended the row; nothing after it)."""
    gc = gc or GenerationConfig()
    if gc.num_beams > 1:
        if decode is not None:
            decode.path = "eager (beam search reorders the cache every step)"
        return beam_search(model, input_ids, attention_mask, gc)
    B = input_ids.shape[0]
    if gc.invariant and input_ids.device.type == "cpu" and B > MAX_ROWS:  # invariant calls of MAX_ROWS rows
        constraints = gc.constraint if isinstance(gc.constraint, (list, tuple)) else [gc.constraint] * B
        out = []
        for s in range(0, B, MAX_ROWS):
            part = slice(s, s + MAX_ROWS)
            sub = replace(gc, seeds=None if gc.seeds is None else gc.seeds[part],
                          constraint=None if gc.constraint is None else constraints[part])
            out += generate(model, input_ids[part], None if attention_mask is None else attention_mask[part], sub,
                            decode, runtime)
        return out
    out: list[list[int]] = [[] for _ in range(B)]
    for tok, done in stream_tokens(model, input_ids, attention_mask, gc, decode, runtime):
        for b, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
            if not d:
                out[b].append(t)
    return out


def greedy(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
           attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None,
           decode: DecodeOptions | None = None, runtime: DecodeRuntime | None = None) -> torch.Tensor:
    """Greedy decoding, returns (B, T + new) like transformers' generate (finished rows padded with eos)."""
    gc = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=eos_ids or [])
    steps = [tok for tok, _ in stream_tokens(model, input_ids, attention_mask, gc, decode, runtime)]
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
