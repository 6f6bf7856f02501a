"""Request bodies (pydantic) and the one function that turns raw bytes into a validated request.

Bounds here are what the model code can run without failing: a value the decoder cannot use (a seed beyond
64 bits, a temperature so small that logits overflow, NaN) is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.serve.errors import ApiError, validation_error

MAX_JSON_DEPTH = 32  # deepest nesting a request may have; real requests need about 6
MIN_TEMPERATURE = 0.01  # below this, logits / temperature overflow float32: 0 means greedy
SEED = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, metadata, ...)


def _temperature(v: float) -> float:
    if 0.0 < v < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return v


class SamplingFields(RequestBody):
    """The OpenAI sampling fields shared by chat and completions, plus lmforge's top_k/min_p/penalty."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; send 0 for greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # lmforge extension (OpenAI clients: extra_body)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)  # lmforge extension
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)  # lmforge extension
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    seed: int | None = SEED
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None

    _check_temperature = field_validator("temperature")(_temperature)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def unsupported(self) -> None:
        """Fields OpenAI has and lmforge does not do: a 400 that says so, rather than silently ignoring them."""
        if self.n != 1:
            raise ApiError(400, "n must be 1 (send several requests; they are batched together)", "n",
                           "unsupported_value")
        if self.frequency_penalty or self.presence_penalty:
            raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty",
                           "frequency_penalty" if self.frequency_penalty else "presence_penalty",
                           "unsupported_value")
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", "logprobs", "unsupported_value")


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(RequestBody):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ClassifyRequest(RequestBody):
    input: str | list[str]
    model: str | None = None


class TaskRequest(RequestBody):
    """Fields shared by the task endpoints (summarize, translate, answer)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # tasks default to greedy, as the CLI does
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0)
    seed: int | None = SEED

    _check_temperature = field_validator("temperature")(_temperature)


class SummarizeRequest(TaskRequest):
    text: str = Field(min_length=1)


class TranslateRequest(TaskRequest):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    text: str = Field(min_length=1)
    to: str = Field(min_length=1)
    source: str | None = Field(None, alias="from")


class AnswerRequest(TaskRequest):
    context: str = Field(min_length=1)
    question: str = Field(min_length=1)


# ---- raw bytes -> request --------------------------------------------------------------------------------
def _finite(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise ValueError(f"number {s[:20]} is out of range")
    return x


def _no_constants(s: str) -> float:
    raise ValueError(f"{s} is not allowed")


def _check_tree(data: Any) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH and lone surrogates ("\\ud800"), which no tokenizer or
    UTF-8 encoder accepts; the error names where the bad string is. Iterative, so depth cannot hurt it."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
        if isinstance(obj, str):
            if not obj.isascii():
                try:
                    obj.encode("utf-8")
                except UnicodeEncodeError:
                    where = f"'{path}'" if path else "request body"
                    raise ApiError(400, f"{where}: string contains a lone UTF-16 surrogate (not valid Unicode)",
                                   path or None, "invalid_value") from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, path, depth + 1))
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(obj, list):
            stack.extend((v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(obj))


def parse_request(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> a validated `model`, or an ApiError (400) that says what is wrong and where."""
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object", None, "invalid_json")
    try:
        data = json.loads(raw, parse_float=_finite, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", None,
                       "invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})", None,
                       "invalid_json") from None
    except ValueError as e:  # not UTF-8, an integer of more than 4300 digits, NaN, 1e999
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    _check_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
