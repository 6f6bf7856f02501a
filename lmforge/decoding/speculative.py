"""Speculative decoding of one row: a cheap drafter proposes k tokens, the model verifies them in one forward over
its KV cache, keeps the longest prefix it agrees with plus one token of its own, and rolls the cache back over
the rest.

Drafters: prompt lookup (the continuation of the latest earlier match of the last n tokens in the prompt and
output: summaries, answers and translations quote their source) and a draft model of the same tokenizer.
Greedy output is the plain loop's token for token: the verification runs each position's attention as the
one-token step does (Stepper.extend, Attention._verify_rows) and the other ops are row-invariant, so the k-row
forward gives the numbers of k steps (docs/generation.md says where that stops). Sampled output keeps the
model's distribution by the speculative-sampling rule (accept draft d with probability min(1, p(d)/q(d)), else
sample from max(p - q, 0) renormalised; a prompt lookup draft is a point mass, so that is p(d), else p without d).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.decoding.invariant import InvariantStepper, invariant_decoding
from lmforge.decoding.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    argmax,
    ban_repeated_ngrams,
    check_request,
    filter_logits,
    seen_tokens,
    stop_ids,
)
from lmforge.decoding.step import DecodeOptions, DecodeRuntime
from lmforge.decoding.stepper import Stepper
from lmforge.errors import GenerationError
from lmforge.model.cache import KVCache
from lmforge.model.transformer import Transformer
from lmforge.quant import QuantLinear

SPECULATIVE_CHOICES = ("auto", "off", "prompt-lookup", "draft")
# drafts verified per forward: k + 1 = 8 rows are one call of the invariant path's float linears (their fixed row
# blocks, lmforge.model.invariant, are 8 rows where the probe allows), and stay on the int kernels' path (<= 32)
DEFAULT_DRAFT_TOKENS = 7
# On int4/int8 weights each verified row adds a good part of a step (integer kernels that are compute-bound per row;
# docs/generation.md). There prompt lookup proposes only after a match of
# 2+ tokens (a 1-token match's drafts were kept too rarely to pay), each call starts at 1 draft, +1 after a fully
# kept round, and a round verifies at most QUANT_MAX_DRAFTS: replaying SmolLM2's answers and summaries, more drafts
# per round gained nothing there, and each further row count is one more verification to trace.
QUANT_MIN_NGRAM = 2
QUANT_MAX_DRAFTS = 3


@dataclass
class SpeculativeOptions:
    """How one call speculates. method: "prompt-lookup" or "draft" (then `draft` is the draft model);
    draft_tokens: k, the most drafts verified per forward (a k-row forward costs more than a one-row step on the
    int4 kernels, so `adaptive` sizes each round by how the last ones went); ngram / min_ngram: the longest and
    shortest suffix prompt lookup matches (the longest match found wins). The decoder fills in the counters."""

    method: str = "prompt-lookup"
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    ngram: int = 3
    min_ngram: int = 1
    draft: Transformer | None = None
    adaptive: bool = True  # k per round: +2 (int4/int8: from 1, +1, at most QUANT_MAX_DRAFTS) after a round
    # that kept all, else -1
    proposed: int = field(default=0, init=False)  # draft tokens verified
    accepted: int = field(default=0, init=False)  # of those, kept
    forwards: int = field(default=0, init=False)  # model forwards after the prefill (verifications + steps)
    tokens: int = field(default=0, init=False)  # tokens emitted

    def __post_init__(self) -> None:
        if self.method not in ("prompt-lookup", "draft"):
            raise GenerationError(f"speculative: {self.method!r} is not prompt-lookup | draft")
        if not 1 <= self.draft_tokens <= 31:
            raise GenerationError(f"draft_tokens must be in 1..31, got {self.draft_tokens}")
        if not 1 <= self.min_ngram <= self.ngram:
            raise GenerationError(f"prompt lookup n-grams: need 1 <= min_ngram <= ngram, got {self.min_ngram}, "
                                  f"{self.ngram}")
        if self.method == "draft" and self.draft is None:
            raise GenerationError("speculative 'draft' needs a draft model (--draft MODEL)")

    @property
    def acceptance(self) -> float:
        """Share of the verified draft tokens that were kept (0 when none was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def summary(self) -> str:
        per = self.tokens / self.forwards if self.forwards else 0.0
        return (f"speculative {self.method}: {self.accepted}/{self.proposed} drafts accepted "
                f"({100 * self.acceptance:.0f}%), {per:.2f} tokens per forward")


def resolve_speculative(method: str, batch: int, gc: GenerationConfig, has_draft: bool,
                        quantized: bool = False, quoting: bool = False) -> str:
    """"off", "prompt-lookup" or "draft" for a call. "auto": the draft model when one is attached, else prompt
    lookup for one prompt on float weights; off for a batch, for beam search, and on quantized weights, where
    a verification costs several steps, so prompt lookup measured no clear gain there (docs/generation.md),
    unless `quoting`: outputs that copy much of their prompt (answers from a context) measured faster with it
    on quantized weights too (docs/benchmarks.md)."""
    if method not in SPECULATIVE_CHOICES:
        raise GenerationError(f"speculative: {method!r} is not one of {' | '.join(SPECULATIVE_CHOICES)}")
    if method == "auto":
        if gc.num_beams > 1:
            return "off"
        return "draft" if has_draft else ("prompt-lookup" if batch == 1 and (quoting or not quantized) else "off")
    if method != "off" and gc.num_beams > 1:
        raise GenerationError("speculative decoding does not do beam search: use num_beams=1 or speculative='off'")
    if method == "draft" and not has_draft:
        raise GenerationError("speculative 'draft' needs a draft model (--draft MODEL)")
    return method


def check_draft(target: Transformer, target_tok, draft: Transformer, draft_tok, name: str = "draft") -> None:
    """Refuse a draft model whose token ids mean something else than the target's (one line, naming it)."""
    if draft_tok is None or target_tok is None:
        raise GenerationError(f"{name}: no tokenizer to compare with the target's; a draft needs the same tokenizer")
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise GenerationError(f"{name}: its tokenizer differs from the target model's (vocabularies of "
                              f"{len(draft_tok)} and {len(target_tok)} tokens); a draft model needs the same one")
    if draft.cfg.vocab_size < len(target_tok):
        raise GenerationError(f"{name}: its embedding has {draft.cfg.vocab_size} rows for a tokenizer of "
                              f"{len(target_tok)} tokens")
    if not draft.cfg.causal:
        raise GenerationError(f"{name}: a {draft.cfg.family} encoder cannot draft tokens")


# ---- drafters ----------------------------------------------------------------------------------------------
class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the context's last n tokens (n from
    `ngram` down to `min_ngram`). An index per n maps each n-gram to where its latest continuation starts, kept
    up to date as tokens arrive: a lookup is a dict access, not a scan."""

    def __init__(self, ids: list[int], ngram: int, min_ngram: int) -> None:
        self.ngram, self.min_ngram = ngram, min_ngram
        self.ctx: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, ngram + 1)}
        self.extend(ids)

    def extend(self, ids: list[int]) -> None:
        ctx = self.ctx
        for t in ids:
            j = len(ctx)
            for n, idx in self.index.items():
                if j >= n:
                    idx[tuple(ctx[j - n: j])] = j  # the n-gram ending before j continues at j
            ctx.append(t)

    def propose(self, k: int) -> list[int]:
        ctx, L = self.ctx, len(self.ctx)
        for n in range(self.ngram, self.min_ngram - 1, -1):
            if L >= n and (j := self.index[n].get(tuple(ctx[L - n:]))) is not None:
                return ctx[j: j + k]
        return []


class DraftModel:
    """A smaller model of the same tokenizer run ahead k tokens (its own eager KV cache, rolled back like the
    target's). Its distributions q go to the acceptance rule; greedy drafts are its argmax."""

    def __init__(self, model: Transformer, max_len: int, vocab: int, device) -> None:
        self.model, self.vocab = model, vocab
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.cfg, 1, max_len, device=device, dtype=dtype)

    def propose(self, ctx: list[int], k: int, proc: _Processor, gen: torch.Generator | None
                ) -> tuple[list[int], list[torch.Tensor] | None]:
        """k drafts after `ctx` (its first cache.length tokens are cached) and, when sampling, their q (V,)."""
        dev = self.cache.k[0].device
        feed = ctx[self.cache.length:]
        drafts: list[int] = []
        qs: list[torch.Tensor] | None = [] if proc.sampling else None
        for _ in range(k):
            h = self.model(torch.tensor([feed], device=dev), cache=self.cache)  # (1, n, D)
            logits = self.model.lm_logits(h[:, -1]).float()[:, : self.vocab]  # (1, V), the target's vocabulary
            if logits.shape[-1] < self.vocab:  # a draft with fewer (padding) rows: those ids are never drafted
                logits = F.pad(logits, (0, self.vocab - logits.shape[-1]), value=float("-inf"))
            logits = proc.process(logits, drafts)
            if qs is None:
                t = int(argmax(logits))
            else:
                q = proc.probs(logits)[0]  # (V,)
                t = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            drafts.append(t)
            feed = [t]
        return drafts, qs

    def keep(self, length: int) -> None:
        self.cache.length = min(self.cache.length, length)


class _Processor:
    """The plain loop's logits processing for one row at any position: repetition penalty over the prompt and the
    output so far, the n-gram ban on the output, then (sampling) temperature and the top-k / top-p / min-p filter."""

    def __init__(self, gc: GenerationConfig, prompt: torch.Tensor, vocab: int) -> None:
        self.gc, self.sampling = gc, gc.temperature > 0
        self.seen = seen_tokens(prompt, None, vocab) if gc.repetition_penalty != 1.0 else None  # (1, V)
        self.out: list[int] = []  # the emitted tokens
        self.n = gc.no_repeat_ngram_size
        self.follow: dict[tuple[int, ...], set[int]] = {}  # each (n-1)-gram of the output -> the tokens after it

    def process(self, logits: torch.Tensor, extra: list[int] = ()) -> torch.Tensor:
        """logits (1, V) at the position after self.out + extra -> processed logits (1, V)."""
        gc, out = self.gc, self.out + list(extra)
        if self.seen is not None:
            seen = self.seen
            if extra:
                seen = seen.clone()
                seen[0, torch.tensor(list(extra), device=seen.device)] = True
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size and len(out) >= gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, torch.tensor([out], device=logits.device), gc.no_repeat_ngram_size)
        return logits

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits (1, V) -> the sampling distribution next_token draws from (1, V)."""
        gc = self.gc
        return filter_logits(logits / gc.temperature, gc.top_k, gc.top_p, gc.min_p).float().softmax(-1)

    def emit(self, t: int) -> None:
        out, n = self.out, self.n
        out.append(t)
        if self.seen is not None:
            self.seen[0, t] = True
        if n and len(out) >= n:
            self.follow.setdefault(tuple(out[len(out) - n: -1]), set()).add(t)

    def greedy(self, logits: torch.Tensor, top: int) -> int:
        """The plain loop's greedy token after self.out from raw logits (1, V) whose argmax is `top`, without
        processing them where that cannot change it: no repetition penalty, and `top` completes no n-gram the
        output holds (the ban only lowers other tokens, so the first maximum stays first)."""
        n, out = self.n, self.out
        if self.seen is None and not (n and len(out) >= n and top in self.follow.get(tuple(out[len(out) - n + 1:]),
                                                                                      ())):
            return top
        return int(self.process(logits).argmax(-1))


def _verify(proc: _Processor, logits: torch.Tensor, d: int, q: torch.Tensor | None,
            gen: torch.Generator | None) -> tuple[int, bool]:
    """The token at a drafted position and whether it is the draft d. Greedy: the argmax. Sampling: d with
    probability min(1, p(d) / q(d)), else a sample from max(p - q, 0) renormalised (q None: a point mass on d)."""
    if not proc.sampling:
        t = int(argmax(logits))
        return t, t == d
    p = proc.probs(logits)[0]  # (V,)
    qd = float(q[d]) if q is not None else 1.0
    u = float(torch.rand(1, generator=gen, device=p.device))
    if qd > 0 and u * qd < float(p[d]):
        return d, True
    if q is None:
        resid = p.clone()
        resid[d] = 0.0
    else:
        resid = (p - q).clamp_min(0.0)
    if float(resid.sum()) <= 0:  # p <= q everywhere: only when p == q, where a rejection has probability 0
        resid = p
    return int(torch.multinomial(resid / resid.sum(), 1, generator=gen)), False


def _choose(proc: _Processor, logits: torch.Tensor, gen: torch.Generator | None) -> int:
    """The token after proc.out from the model's raw logits (1, V), as the plain loop chooses it."""
    if not proc.sampling:
        return proc.greedy(logits, int(argmax(logits)))
    return int(torch.multinomial(proc.probs(proc.process(logits))[0], 1, generator=gen))


@torch.inference_mode()
def speculative_tokens(model: Transformer, input_ids: torch.Tensor, gc: GenerationConfig | None = None,
                       spec: SpeculativeOptions | None = None, decode: DecodeOptions | None = None,
                       runtime: DecodeRuntime | None = None) -> Iterator[int]:
    """Yield the new token ids of one unpadded row (1, T), as stream_tokens would for it: a stop id is yielded
    once and ends the row; at most gc.max_new_tokens. The one-token steps (no draft found) run the runtime's
    step (eager, traced or compiled); verifications run over the same cache, traced per row count where the steps
    are (DecodeRuntime.verify_hidden), else eagerly."""
    gc = gc or GenerationConfig()
    spec = spec or SpeculativeOptions()
    check_request(model, input_ids, gc)
    if input_ids.shape[0] != 1:
        raise GenerationError(f"speculative decoding runs one row at a time, got a batch of {input_ids.shape[0]}")
    if gc.num_beams > 1:
        raise GenerationError("speculative decoding does not do beam search")
    if runtime is not None and runtime.model is not model:
        raise GenerationError("speculative_tokens: the DecodeRuntime belongs to another model")
    dev = input_ids.device
    gen = torch.Generator(device=dev).manual_seed(gc.seed) if gc.seed is not None else None
    stop = set(stop_ids(model, gc))
    prompt = input_ids[0].tolist()
    vocab = model.cfg.vocab_size
    proc = _Processor(gc, input_ids, vocab)
    costly = any(isinstance(m, QuantLinear) for m in model.modules())  # a verification costs several steps
    min_ngram = min(spec.ngram, max(spec.min_ngram, QUANT_MIN_NGRAM)) if costly else spec.min_ngram
    lookup = PromptLookup(prompt, spec.ngram, min_ngram) if spec.method == "prompt-lookup" else None
    drafter = (DraftModel(spec.draft, len(prompt) + gc.max_new_tokens, vocab, dev)
               if spec.method == "draft" else None)
    # gc.invariant (the Generator's default): the steps and verifications of the plain loop's invariant path
    # (decoding/invariant.py), so that greedy text stays that of the plain loop
    invariant = gc.invariant and dev.type == "cpu"
    decode = decode if decode is not None else DecodeOptions()
    decode.invariant = invariant
    with invariant_decoding(model, invariant):
        make = InvariantStepper if invariant else Stepper
        stepper = make(runtime or DecodeRuntime(model), input_ids, None, gc.max_new_tokens, decode)
        yield from _rounds(model, input_ids, gc, spec, decode, stepper, proc, lookup, drafter, gen, stop, costly)


def verify_logits(stepper: Stepper, tokens: torch.Tensor, ahead: int = 0) -> torch.Tensor:
    """Stepper.extend's logits (n, V) for tokens (1, n); where the steps replay a trace, the verification does
    too once enough rounds of n rows come to pay for its trace (DecodeRuntime.verify_hidden: the same rows, a trace
    per n; `ahead`: the rounds of n rows this call may still make), else Stepper.extend's eager forward."""
    if stepper.traced:
        h = stepper.runtime.verify_hidden(stepper.cache, tokens, now=stepper.opts.compile == "trace",
                                          ahead=ahead)  # (n, D)
        if h is not None:
            return stepper.model.lm_logits(h).float()  # (n, V)
    return stepper.extend(tokens)


def _rounds(model: Transformer, input_ids: torch.Tensor, gc: GenerationConfig, spec: SpeculativeOptions,
            decode: DecodeOptions, stepper: Stepper, proc: _Processor, lookup: PromptLookup | None,
            drafter: DraftModel | None, gen: torch.Generator | None, stop: set[int], costly: bool = False
            ) -> Iterator[int]:
    """The decode loop of speculative_tokens: draft, verify in one forward, keep the agreed prefix, roll back.
    costly: a verification costs several steps (int4/int8 weights): adaptive rounds start at 1 draft, grow by 1."""
    dev = input_ids.device
    prompt = input_ids[0].tolist()
    grow = 1 if costly else 2
    most = min(spec.draft_tokens, QUANT_MAX_DRAFTS) if costly and spec.adaptive else spec.draft_tokens
    k = 1 if costly and spec.adaptive else most
    try:
        tok = _choose(proc, stepper.prefill(input_ids), gen)
        while True:
            proc.emit(tok)
            spec.tokens += 1
            if lookup is not None:
                lookup.extend([tok])
            yield tok
            n = len(proc.out)
            if tok in stop or n >= gc.max_new_tokens:
                return
            room = min(k, gc.max_new_tokens - n - 1)  # the last round's bonus token fits too
            qs = None
            if room <= 0:
                drafts = []
            elif lookup is not None:
                drafts = lookup.propose(room)
            else:
                drafts, qs = drafter.propose(prompt + proc.out, room, proc, gen)
            spec.forwards += 1
            if not drafts:
                tok = _choose(proc, stepper.step(torch.tensor([tok], device=dev)), gen)
                continue
            base = stepper.cache.length  # the pending token `tok` goes in at this column
            ahead = (gc.max_new_tokens - n) // (1 + len(drafts))  # the most rounds of this size still to come
            logits = verify_logits(stepper, torch.tensor([[tok, *drafts]], device=dev), ahead)  # (1 + k, V)
            spec.proposed += len(drafts)
            accepted = 0
            tops = None if proc.sampling else argmax(logits).tolist()  # each row's raw argmax, in one call
            for i, d in enumerate(drafts):
                if tops is not None:
                    t = proc.greedy(logits[i: i + 1], tops[i])
                    ok = t == d
                else:
                    t, ok = _verify(proc, proc.process(logits[i: i + 1]), d, qs[i] if qs else None, gen)
                if not ok:
                    tok = t
                    break
                accepted += 1
                proc.emit(t)
                spec.tokens += 1
                if lookup is not None:
                    lookup.extend([t])
                yield t
                if t in stop or len(proc.out) >= gc.max_new_tokens:
                    spec.accepted += accepted
                    return
            else:  # every draft kept: the model's own token after them
                tok = proc.greedy(logits[-1:], tops[-1]) if tops is not None else _choose(proc, logits[-1:], gen)
            spec.accepted += accepted
            if spec.adaptive:
                k = min(most, k + grow) if accepted == len(drafts) else max(1, k - 1)
            stepper.keep(base + 1 + accepted)
            if drafter is not None:
                drafter.keep(base + 1 + accepted)
    finally:
        stepper.close()
        if decode is not None:
            decode.path = f"{decode.path}; {spec.summary()}" if decode.path else spec.summary()


def speculative_generate(model: Transformer, input_ids: torch.Tensor, gc: GenerationConfig | None = None,
                         spec: SpeculativeOptions | None = None, decode: DecodeOptions | None = None,
                         runtime: DecodeRuntime | None = None) -> list[int]:
    """The new token ids of one unpadded row (1, T) (the stop id included when one ended it)."""
    return list(speculative_tokens(model, input_ids, gc, spec, decode, runtime))
