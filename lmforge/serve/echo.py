"""`echo` in /v1/completions, seen from the event loop: the prompt's own token log-probabilities (scored on the
scheduler's worker thread, serve/scoring.py) in OpenAI's completions shape, where the first token has `null`
(nothing precedes it), followed by the generated tokens' entries when max_tokens > 0.

text_offset counts characters of the returned text (prompt + completion); a special token (BOS) that decoding
leaves out of the text takes no characters.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lmforge.serve.errors import ApiError
from lmforge.serve.requests import TokenLogprob
from lmforge.serve.routes_common import note
from lmforge.serve.scoring import Scored, ScoreRequest

if TYPE_CHECKING:
    from lmforge.serve.state import ServerState


async def score(request: Request, st: ServerState, prompts: list[list[int]], top: int) -> list[list[Scored]]:
    """Score every prompt on the worker thread -> per prompt, one Scored per token after the first."""
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in prompts]

    def done_cb(fut: asyncio.Future):
        def done(result, error) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

            loop.call_soon_threadsafe(settle)

        return done

    reqs = [ScoreRequest(ids, top, done_cb(f)) for ids, f in zip(prompts, futs)]
    st.sched.submit_score(reqs)
    gone = asyncio.create_task(_disconnect(request))
    try:
        waiting = asyncio.gather(*futs)
        finished, _ = await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
        if waiting not in finished:
            note(request, disconnected=True)
            waiting.cancel()
            raise ApiError(499, "client closed the request", None, "client_closed")
        return waiting.result()
    finally:
        gone.cancel()
        for q in reqs:
            q.cancelled = True  # the worker skips those it has not taken yet


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EchoLogprobs:
    """Builds one choice's completions-shape logprobs: the echoed prompt, then generated tokens as they come."""

    def __init__(self, st: ServerState, prompt_ids: list[int], scored: list[Scored]) -> None:
        self.fmt = st.logprobs
        self.special = set(st.generator.tokenizer.all_special_ids)
        self.out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0
        self._add(prompt_ids[0], None, None)
        for t, v, alts in scored:
            self._add(t, v, alts)

    def _add(self, token: int, logprob: float | None, alts: list[tuple[int, float]] | None) -> None:
        text = self.fmt.piece(token)[0]
        self.out["tokens"].append(text)
        self.out["token_logprobs"].append(logprob)
        top: dict[str, float] | None = None
        if alts is not None:  # two tokens may share a text: the dict keeps the more likely one
            top = {}
            for t, v in alts:
                top.setdefault(self.fmt.piece(t)[0], v)
        self.out["top_logprobs"].append(top)
        self.out["text_offset"].append(self.offset)
        if token not in self.special:
            self.offset += len(text)

    def extend(self, lps: list[TokenLogprob]) -> dict[str, list[Any]]:
        """Add generated tokens -> the entries just added (a stream's chunk)."""
        start = len(self.out["tokens"])
        for lp in lps:
            self._add(lp.token, lp.logprob, lp.top)
        return {key: v[start:] for key, v in self.out.items()}
