"""benchmarks/speculative.py's copy_bound: the ceiling it reports must hold for lmforge's own prompt lookup."""

import random

from benchmarks.speculative import copy_bound
from lmforge.decoding.speculative import PromptLookup


def _lookup_forwards(prompt: list[int], out: list[int], k: int, ngram: int, min_ngram: int) -> int:
    """Forwards that prompt lookup needs to decode `out` greedily (the first token from the prefill): each round
    verifies its drafts against `out` and keeps the agreed prefix plus the forward's own token."""
    lookup = PromptLookup(prompt, ngram, min_ngram)
    lookup.extend(out[:1])
    i, forwards = 1, 1
    while i < len(out):
        drafts = lookup.propose(min(k, len(out) - i - 1))
        kept = 0
        while kept < len(drafts) and drafts[kept] == out[i + kept]:
            kept += 1
        lookup.extend(out[i: i + kept + 1])
        i, forwards = i + kept + 1, forwards + 1
    return forwards


def test_copy_bound_cases() -> None:
    # 9 from the prefill; 1 has no earlier occurrence of 9 to follow; then 2 3 4 5 copied after the 1, and 8
    assert copy_bound([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5, 8]) == 3
    assert copy_bound([1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5, 8], most=2) == 4
    assert copy_bound([1, 2, 3], [7, 8, 9]) == 3  # nothing to copy: a forward per token
    # not anchored: the copy of 1 2 3 may start right after the 7
    assert copy_bound([1, 2, 3], [7, 1, 2, 3, 8], anchored=False) == 2
    assert copy_bound([1, 2, 3], [7, 1, 2, 3, 8]) == 3  # anchored: 1 computed, then 2 3 copied after it, 8
    assert copy_bound([], [5, 5, 5, 5, 5]) == 4  # the output is context too: 5 | 5 | (5) 5 | 5


def test_copy_bound_never_above_prompt_lookup() -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompt = [rng.randrange(12) for _ in range(rng.randrange(5, 60))]
        out = []
        while len(out) < 40:  # copied spans of the prompt mixed with new tokens
            if rng.random() < 0.5 and prompt:
                s = rng.randrange(len(prompt))
                out += prompt[s: s + rng.randrange(1, 9)]
            else:
                out.append(rng.randrange(12))
        for k in (1, 3, 7):
            bound = copy_bound(prompt, out, most=k)
            assert copy_bound(prompt, out, most=k, anchored=False) <= bound <= copy_bound(prompt, out, most=1)
            for ngram, min_ngram in ((3, 1), (3, 2), (1, 1), (6, 1)):
                assert bound <= _lookup_forwards(prompt, out, k, ngram, min_ngram)
        assert copy_bound(prompt, out) <= copy_bound(prompt, out, most=7)
