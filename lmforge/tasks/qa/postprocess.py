"""QA post-processing: the best answer span of each question over all its windows, from start/end logits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.data.squad import SquadExample
from lmforge.errors import ConfigError

SELECTIONS = ("max", "expected-f1")


def _trimmed(context: str, a: int, b: int) -> tuple[int, int]:
    """Character span [a, b) without its outer whitespace."""
    raw = context[a:b]
    a += len(raw) - len(raw.lstrip())
    b -= len(raw) - len(raw.rstrip())
    return a, max(a, b)


def _expected_f1_pick(texts: Sequence[str], probs: np.ndarray) -> int:
    """Index of the candidate whose expected SQuAD F1 against the candidate distribution is highest.

    Minimum-Bayes-risk choice: the answer the model's own probabilities say scores best on the metric. A
    long span that overlaps most of the probability mass can beat the single most likely short span, and
    several windows' copies of one answer pool their mass. Ties keep the more probable candidate.
    """
    from lmforge.metrics import squad_normalize, token_f1

    toks = [squad_normalize(t).split() for t in texts]
    k = len(toks)
    f1 = np.zeros((k, k))  # (k, k), symmetric; an empty answer scores 0 even against itself, as in SQuAD v1.1
    for i in range(k):
        for j in range(i, k):
            f1[i, j] = f1[j, i] = (1.0 if toks[i] else 0.0) if toks[i] == toks[j] else token_f1(toks[i], toks[j])
    return int(np.argmax(f1 @ probs))  # first maximum = most probable among equals (cands are sorted)


def best_answers(examples: Sequence[SquadExample], feats: list[dict[str, Any]], starts: Sequence[np.ndarray],
                 ends: Sequence[np.ndarray], n_best: int = 20, max_answer_length: int = 30,
                 selection: str = "max") -> list[dict[str, Any]]:
    """The best span of each example over all its windows -> {answer, score, start, end, logit}.

    In each window the `n_best` highest start and end logits over the context tokens are paired; spans with
    end < start or longer than `max_answer_length` tokens are discarded; the `n_best` spans with the highest
    start + end logit over all windows are the candidates, with softmax probabilities over them. selection
    "max" answers the most probable candidate; "expected-f1" the one with the highest expected F1 against the
    others (`_expected_f1_pick`). The span's offsets give the context substring (outer whitespace trimmed).
    score: the chosen candidate's probability; start/end: character offsets (end exclusive).
    """
    if selection not in SELECTIONS:
        raise ConfigError(f"answer selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    by_example: dict[int, list[int]] = defaultdict(list)
    for fi, f in enumerate(feats):
        by_example[f["example"]].append(fi)
    out: list[dict[str, Any]] = []
    for ei, ex in enumerate(examples):
        cands: list[tuple[float, int, int]] = []  # (start + end logit, char start, char end)
        for fi in by_example.get(ei, []):
            f = feats[fi]
            c0, offs = f["context_start"], f["offsets"]
            s = np.asarray(starts[fi][c0: c0 + len(offs)], dtype=np.float64)
            e = np.asarray(ends[fi][c0: c0 + len(offs)], dtype=np.float64)
            k = min(n_best, len(offs))
            si = np.argsort(-s, kind="stable")[:k]  # (k,) context-token indices
            ej = np.argsort(-e, kind="stable")[:k]
            length = ej[None, :] - si[:, None]  # (k, k) last - first
            total = s[si][:, None] + e[ej][None, :]
            ok = (length >= 0) & (length < max_answer_length)
            for a, b in zip(*np.nonzero(ok)):
                cands.append((float(total[a, b]), offs[si[a]][0], offs[ej[b]][1]))
        if not cands:
            out.append({"answer": "", "score": 0.0, "start": None, "end": None, "logit": None})
            continue
        cands.sort(key=lambda x: -x[0])
        cands = cands[:max(1, n_best)]
        logits = np.array([c[0] for c in cands])
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        spans = [_trimmed(ex.context, a, b) for _, a, b in cands]
        i = 0 if selection == "max" else _expected_f1_pick([ex.context[a:b] for a, b in spans], probs)
        a, b = spans[i]
        out.append({"answer": ex.context[a:b], "score": round(float(probs[i]), 6), "start": a, "end": b,
                    "logit": round(cands[i][0], 4)})
    return out
