"""Prompt scoring: the log-probability of each prompt token given the tokens before it (`echo` + `logprobs` in
/v1/completions, what lm-evaluation-harness asks for to compute log-likelihoods).

Scoring runs on the scheduler's worker thread (the one thread that owns the model), between decode steps: the
worker takes waiting ScoreRequests up to SCORE_BATCH_TOKENS padded positions and runs them as one right-padded
forward without a KV cache (`score_prompts`). The log-probabilities are those of the model's own distribution,
log_softmax of the float32 logits, as the decode path reports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SCORE_BATCH_TOKENS = 8192  # padded positions in one scoring forward (a longer prompt runs alone)
HEAD_CHUNK = 512  # positions per LM-head call: bounds the (positions, vocab) float32 logits held at once

# one scored position: (token id, its log-probability, [(alternative id, log-probability)] most likely first)
Scored = tuple[int, float, list[tuple[int, float]]]


@dataclass(eq=False)
class ScoreRequest:
    """One prompt to score; `done(result, error)` is called once from the worker thread.

    result: one Scored per prompt token after the first (the first has no context to be predicted from).
    """

    prompt_ids: list[int]
    top: int  # alternatives per position (0: none)
    done: Callable[[list[Scored] | None, BaseException | None], None]
    cancelled: bool = False
    finished: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)


def take_batch(waiting, budget: int = SCORE_BATCH_TOKENS) -> list[ScoreRequest]:
    """Pop waiting requests (FIFO, a deque) while rows x longest prompt fits `budget` (at least one)."""
    out: list[ScoreRequest] = []
    longest = 0
    while waiting:
        r = waiting[0]
        if r.cancelled:
            waiting.popleft()
            continue
        n = max(longest, len(r.prompt_ids))
        if out and (len(out) + 1) * n > budget:
            break
        out.append(waiting.popleft())
        longest = n
    return out


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], tops: list[int]) -> list[list[Scored]]:
    """Each prompt's per-token log-probabilities (positions 1..n-1) from one right-padded float forward."""
    device = next(model.parameters()).device
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)  # (B, T) right-padded
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=device)  # (B, T) 1 = real
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        mask[b, : len(p)] = 1
    h = model(ids, mask if any(len(p) < T for p in prompts) else None)  # (B, T, D)
    out = []
    for b, (p, k) in enumerate(zip(prompts, tops)):
        rows: list[Scored] = []
        target = torch.tensor(p[1:], dtype=torch.long, device=device)  # (n - 1,) the tokens each position predicts
        for s in range(0, len(p) - 1, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, len(p) - 1)
            logp = model.lm_logits(h[b, s:e]).float().log_softmax(-1)  # (e - s, V)
            lp = logp.gather(-1, target[s:e, None])[:, 0].tolist()
            if k > 0:
                top = logp.topk(min(k, logp.shape[-1]), dim=-1)
                alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                alts = [[] for _ in range(e - s)]
            rows += [(t, v, a) for t, v, a in zip(p[s + 1: e + 1], lp, alts)]
        out.append(rows)
    return out
