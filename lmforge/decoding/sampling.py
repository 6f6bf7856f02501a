"""What a decode step computes from the logits: GenerationConfig, the logits processors (repetition penalty,
n-gram ban, top-k / top-p / min-p) and the choice of the next token (argmax or a seeded sample)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import GenerationError


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
    # every row samples from its own torch.Generator: `seed` starts each row's from it (a row's draws do not
    # depend on its neighbours: the same text alone and in any batch); `seeds`, one per row, instead
    seed: int | None = None
    seeds: list[int] | None = None
    # batch invariance (decoding/invariant.py): a row's numbers are those it gets alone, whatever else shares
    # the call (CPU; docs/generation.md, "Batch invariance"); `Generator` turns it on by default. False: one
    # padded batch call per layer, rows may differ from alone in the last bits (and so in tokens)
    invariant: bool = False
    # decoding.constraints.Constraint for every row, or a list with one per row (None = a free row)
    constraint: Any = None

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
        if self.constraint is not None and self.num_beams > 1:
            raise GenerationError("beam search with a constraint (json_schema / regex / grammar / choices) is not "
                                  "supported: set num_beams=1")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop_strings must not contain an empty string")
        if self.seeds is not None and (self.seed is not None or not all(isinstance(s, int) for s in self.seeds)):
            raise GenerationError(f"seeds must be a list of ints (one per row), given instead of seed: {self.seeds!r}")


def check_request(model, input_ids: torch.Tensor, gc: GenerationConfig) -> None:
    """Validate `gc` and that a (B, T) prompt plus max_new_tokens fits the model's context."""
    gc.validate()
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError("empty prompt: give at least one token")
    total = input_ids.shape[1] + gc.max_new_tokens
    if total > model.cfg.context_length:
        raise GenerationError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {gc.max_new_tokens} exceeds the model's "
            f"context length {model.cfg.context_length}"
        )


def stop_ids(model, gc: GenerationConfig) -> list[int]:
    """The token ids that end a row: the config's, else the model's eos ids."""
    return list(gc.stop_token_ids) if gc.stop_token_ids is not None else model.cfg.eos_ids


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the prompt tokens of each row (padding excluded), for the repetition penalty."""
    B = input_ids.shape[0]
    seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=input_ids.device)
    real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
    rows, cols = (real >= 0).nonzero(as_tuple=True)
    seen[rows, real[rows, cols]] = True
    return seen


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


def row_generators(gc: GenerationConfig, rows: int, device) -> list[torch.Generator | None]:
    """One torch.Generator per row (None each when unseeded): gc.seed seeds every row's, gc.seeds gives row b
    seeds[b] (GenerationError when its length is not the batch's)."""
    if gc.seed is None and gc.seeds is None:
        return [None] * rows
    seeds = list(gc.seeds) if gc.seeds is not None else [gc.seed] * rows
    if len(seeds) != rows:
        raise GenerationError(f"seeds: {len(seeds)} given for a batch of {rows} rows")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def next_tokens(logits: torch.Tensor, gc: GenerationConfig, gens: list[torch.Generator | None],
                per_row: bool = False) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids. Sampling runs one call per row with the row's own generator
    (when seeded, or per_row: the batch-invariant path, where a row's filter and softmax are the calls it makes
    alone); argmax is exact per row and runs batched."""
    if gc.temperature == 0.0 or not (per_row or any(g is not None for g in gens)):
        return next_token(logits, gc, None)
    return torch.cat([next_token(logits[b: b + 1], gc, g) for b, g in enumerate(gens)])  # (B,)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) int64: the first maximum's index, as torch.argmax (NaN counts as the maximum there and
    here). On a CPU through numpy's vectorised argmax, which is an order of magnitude faster than torch's
    (docs/benchmarks.md, "Model families")."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def next_token(logits: torch.Tensor, gc: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or a sample from the filtered distribution."""
    if gc.temperature == 0.0:
        return argmax(logits)
    logits = filter_logits(logits / gc.temperature, gc.top_k, gc.top_p, gc.min_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
