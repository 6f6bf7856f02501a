"""Prompt-lookup speculative decoding in the server: a greedy row alone in the batch runs speculative rounds
(decoding/speculative.py's PromptLookup drafts, verified in one forward by BatchDecoder.extend) instead of
one-token steps, and goes back to plain steps as soon as another request waits, prefills or runs.

Why only there: a verification forward is one row's; with other rows the step is shared anyway. Why only greedy
rows without a constraint, a repetition penalty or an adapter: the verified rows give exactly the numbers of the
one-token steps (Stepper.extend's rule, on the batch-invariant path), so a greedy row's tokens and logprobs are
the same with speculation on or off and whatever else the server runs; a sampled row would draw its random
numbers differently when alone (the acceptance rule) than in a batch, and a seed must give the same text however
busy the server is. Without batch invariance (a GPU, --batch-invariant off) a T-row forward is not T steps bit
for bit, so the server does not speculate there. Stats: the scheduler's `stats` (GET /health).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lmforge.decoding.sampling import GenerationConfig
from lmforge.decoding.speculative import DEFAULT_DRAFT_TOKENS, QUANT_MIN_NGRAM, PromptLookup, resolve_speculative
from lmforge.errors import GenerationError
from lmforge.quant import QuantLinear
from lmforge.serve.engine import BatchDecoder

SERVER_SPECULATIVE = ("auto", "off", "prompt-lookup")  # a request's `speculative` and `lmforge serve --speculative`


def server_default(mode: str, model) -> str:
    """The server's --speculative -> what a request's "auto" means: "prompt-lookup" or "off" (the Generator's rule
    for one greedy prompt: off on quantized weights, where a verification costs several steps)."""
    if mode not in SERVER_SPECULATIVE:
        raise GenerationError(f"serve: speculative {mode!r} is not one of {' | '.join(SERVER_SPECULATIVE)}")
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    return resolve_speculative(mode, 1, GenerationConfig(), False, quantized)


@dataclass
class _Drafts:
    """The speculating row's drafter and its adaptive draft count."""

    req: object  # the GenRequest it belongs to
    lookup: PromptLookup
    k: int


class Speculator:
    """Runs the worker's iteration as a speculative round where one applies (`round`), with the scheduler's own
    delivery of each token (text, logprobs, stop strings, the end) and removal of an ended row."""

    def __init__(self, default: str, engine: BatchDecoder, stats: dict,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, ngram: int = 3, min_ngram: int = 1) -> None:
        """default: the server's --speculative; engine: the running batch (no speculation unless its steps are
        batch-invariant); stats: the scheduler's counters, where spec_rounds / spec_drafted / spec_accepted go."""
        model = engine.model
        self.engine, self.default = engine, server_default(default, model)
        self.context_length = model.cfg.context_length
        invariant = engine.invariant
        cfg = model.cfg
        sliding = bool(cfg.sliding_window) and cfg.layer_types is not None and "sliding" in cfg.layer_types
        # why rounds cannot match the steps here (None: they can): Stepper.extend's limits and the engine's
        self.why = ("steps are not batch-invariant" if not invariant else
                    "sliding-window layers" if sliding else
                    "not a causal model" if not cfg.causal else None)
        self.costly = any(isinstance(m, QuantLinear) for m in model.modules())  # a verification costs several steps
        self.draft_tokens, self.ngram = draft_tokens, ngram
        self.min_ngram = min(ngram, max(min_ngram, QUANT_MIN_NGRAM)) if self.costly else min_ngram
        self.stats = stats
        stats.update(spec_rounds=0, spec_drafted=0, spec_accepted=0)
        self._row: _Drafts | None = None  # one row speculates at a time

    def method(self, params) -> str:
        """A request's `speculative` with "auto" resolved to the server's default."""
        mode = getattr(params, "speculative", "auto")
        return self.default if mode == "auto" else mode

    def wants(self, rows: list, busy: bool) -> bool:
        """Whether this iteration may be a round: one greedy row on the base weights, nothing else to do (busy:
        requests wait, prompts are being prefilled or scored), and its request asked for speculation (or left it
        to the default)."""
        if self.why is not None or busy or len(rows) != 1:
            return False
        row = rows[0]
        r = row.req
        return (not (r.cancelled or r.finished) and row.sampler.plain_greedy and r.params.adapter is None
                and self.method(r.params) == "prompt-lookup" and self.engine.lone)

    def round(self, rows: list, busy: bool, deliver: Callable, drop: Callable) -> bool:
        """One speculative round of the lone row (rows: the scheduler's running rows) when `wants` says so: drafts
        from prompt lookup, one verifying forward, each kept token given to deliver(row, token, logprobs (V,) or
        None) -> whether the row goes on, as a step's; drop(rows, [0], store=True) when it ended. False (nothing
        done): no round applies, no draft, or no room for one; the caller runs a plain step."""
        if not self.wants(rows, busy):
            return False
        row = rows[0]
        r, p, eng = row.req, row.req.params, self.engine
        ctx = eng.row_kv(0)[0]  # the row's fed tokens (prompt and output); row.next is still to feed
        d = self._row
        if d is None or d.req is not r:
            d = self._row = _Drafts(r, PromptLookup([], self.ngram, self.min_ngram),
                                    1 if self.costly else self.draft_tokens)
        d.lookup.extend(ctx[len(d.lookup.ctx):] + [row.next])  # the drafter's context: every token so far
        room = min(d.k, p.max_tokens - r.completion_tokens - 1, self.context_length - len(ctx) - 1)
        drafts = d.lookup.propose(room) if room > 0 else []
        if not drafts:
            return False
        logits = eng.extend([row.next, *drafts])  # (1 + k, V)
        # the step's argmax (numpy's on a CPU, as _decode_step) and per-row log_softmax (its invariant logprobs)
        greedy = (logits.numpy() if logits.device.type == "cpu" else logits).argmax(-1).tolist()
        accepted, going = 0, True
        for i, tok in enumerate(greedy):
            logp = logits[i: i + 1].log_softmax(-1)[0] if p.logprobs is not None else None  # (V,)
            going = deliver(row, tok, logp)
            if not going or i == len(drafts) or tok != drafts[i]:
                break
            accepted += 1
        eng.keep(1 + accepted)  # the fed token and the drafts it kept
        self.stats["spec_rounds"] += 1
        self.stats["spec_drafted"] += len(drafts)
        self.stats["spec_accepted"] += accepted
        grow = 1 if self.costly else 2
        d.k = min(self.draft_tokens, d.k + grow) if accepted == len(drafts) else max(1, d.k - 1)
        if not going:
            self._row = None
            drop(rows, [0], store=True)
        return True
