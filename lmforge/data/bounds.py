"""Bounds on text that reaches a tokenizer: one data row must not cost more than its truncated tokens need.

A tokenizer turns a text into tokens before truncating them, so a 150 MB row given `--max-length 64` costs the
time and memory of all its tokens (gigabytes) to keep 64. Rows are therefore cut by characters first, to
CHARS_PER_TOKEN characters per token wanted (ordinary text has 3 to 5 characters per token), at a space so no
word is split, and the cut is verified: a cut text that yields too few tokens (long runs of spaces or of characters
the tokenizer drops) is cut again four times longer, up to the whole text, so the kept tokens are those of the
whole text. A field longer than MAX_FIELD_CHARS is refused by the readers before any of this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CHARS_PER_TOKEN = 16  # characters kept per token wanted, before the verification
SLACK_TOKENS = 16  # tokens a cut text must give beyond max_length: the last word before the cut may split otherwise
MAX_FIELD_CHARS = 10_000_000  # longest text one field of a data row may hold (10 M characters, ~2.5 M tokens)


def clip_text(text: str, n: int) -> str:
    """`text` cut to at most `n` characters, at the last space of the second half when there is one."""
    if len(text) <= n:
        return text
    space = text.rfind(" ", n // 2, n)
    return text[:space if space > 0 else n]


def clip_for_tokens(texts: Sequence[str], max_length: int, count: Callable[[list[str]], list[int]]) -> list[str]:
    """`texts`, each cut so that tokenizing it gives the same first `max_length` tokens as the whole text does;
    `count(texts)` -> their token counts (no special tokens). Only texts longer than the first cut are counted."""
    out = list(texts)
    n = max(1, max_length) * CHARS_PER_TOKEN
    pending = [i for i, t in enumerate(out) if len(t) > n]
    while pending:
        cut = [clip_text(texts[i], n) for i in pending]
        counts = count(cut)
        again = []
        for i, c, k in zip(pending, cut, counts):
            if k >= max_length + SLACK_TOKENS or len(c) == len(texts[i]):
                out[i] = c
            else:
                again.append(i)
        pending, n = again, n * 4
    return out
