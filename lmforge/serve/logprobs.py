"""Token log-probabilities (requests.TokenLogprob: ids and floats) in OpenAI's two response shapes.

chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

`bytes` is the token's exact bytes (a token may hold half a UTF-8 character; `token` then shows U+FFFD).
"""

from __future__ import annotations

from typing import Any

from lmforge.serve.requests import TokenLogprob


class LogprobFormatter:
    """Token ids -> strings and bytes, cached (a vocabulary is small next to what a server decodes)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def piece(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            b = self.tokenizer.token_bytes(token)
            hit = self._cache[token] = (b.decode("utf-8", "replace"), list(b))
        return hit

    def chat(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for lp in lps:
            text, b = self.piece(lp.token)
            top = []
            for t, v in lp.top:
                tt, tb = self.piece(t)
                top.append({"token": tt, "logprob": v, "bytes": tb})
            content.append({"token": text, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def completion(self, lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """`offset`: characters of this choice's text before these tokens (streams continue the count)."""
        tokens, offsets = [], []
        for lp in lps:
            text, _ = self.piece(lp.token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.piece(t)[0]: v for t, v in lp.top} for lp in lps], "text_offset": offsets}

