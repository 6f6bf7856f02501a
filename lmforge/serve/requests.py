"""What a generation request is, as the scheduler (serve/batching.py) and the routes see it: its sampling
parameters, the events the worker sends back, and the two refusals (overloaded, shutting down)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.errors import LmforgeError
from lmforge.model.multi_lora import AdapterRef


class Overloaded(LmforgeError):
    """Every generation slot and queue place is taken: the server answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(LmforgeError):
    """The scheduler was closed while the request waited or ran."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (the OpenAI request fields, plus lmforge's top_k/min_p/penalty)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely
    group: int | None = None  # the rows of one request (its n choices): a seed gives each choice its own stream
    constraint: object | None = None  # a decoding.constraints.Constraint the text follows (each row its own matcher)
    stop_logprob: bool = False  # logprobs also for the EOS token that ends the row (echo: OpenAI lists it)
    adapter: AdapterRef | None = None  # the LoRA adapter the row runs with (serve/adapters.py); None: the base
    speculative: str = "auto"  # "auto" (the server's default) | "off" | "prompt-lookup": serve/speculate.py


@dataclass
class TokenLogprob:
    """One completion token's log-probability and the most likely alternatives at its step (ids, not text)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Event:
    """What the worker tells a request: a text piece, the end (with why), or an error."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" (done only)
    completion_tokens: int = 0
    error: BaseException | None = None
    logprobs: list[TokenLogprob] | None = None  # text only: the tokens behind this piece (when asked for)


@dataclass(eq=False)
class GenRequest:
    """One generation: prompt ids, params, and `emit(Event)` (called from the worker thread)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False
    finished: bool = False
    completion_tokens: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # its prefill began
    first_token_at: float | None = None  # for the speed figures the API reports ("timings")
    finished_at: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens whose text is still held back
    choice: int = 0  # its index among the rows of its seeded group (set by submit_many): picks its generator seed
