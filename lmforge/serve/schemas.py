"""Request bodies (pydantic) and the one function that turns raw bytes into a validated request.

Bounds here are what the model code can run without failing: a value the decoder cannot use (a seed beyond
64 bits, a temperature so small that logits overflow, NaN) is a 400 naming the field, never a 500.

Nothing is coerced: a value of the wrong JSON type (`max_tokens: true`, `n: "2"`, `stream: 1`) is a 400 naming the
field (integers may be given for floats, as JSON does not tell them apart).

Nothing is silently ignored: a field no schema declares is a 400 naming it, and OpenAI parameters that lmforge
does not implement (logit_bias, audio, ...) are a 400 that says so, unless their value asks for nothing
(`logit_bias: {}`); see NOT_IMPLEMENTED.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmforge.serve.errors import ApiError, validation_error

MAX_JSON_DEPTH = 32  # deepest nesting a request may have; real requests need about 6
MIN_TEMPERATURE = 0.01  # below this, logits / temperature overflow float32: 0 means greedy
SEED = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs (completions allow 5; we allow 20 for both)
MAX_N = 128  # choices per request in the schema; the server's max_concurrent bounds it further


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# top-level OpenAI parameters that no schema declares: accepted (and dropped) only when the value asks for nothing
NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "user": (lambda v: True, ""),  # an end-user id for abuse monitoring: nothing to do
    "safety_identifier": (lambda v: True, ""),
    "prompt_cache_key": (lambda v: True, ""),  # a cache hint
    "metadata": (lambda v: True, ""),  # tags for stored completions
    "store": (lambda v: v in (None, False), "lmforge does not store completions"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "lmforge has one service tier"),
    # tools, tool_choice and parallel_tool_calls are ChatRequest fields; elsewhere (completions) these apply
    "tools": (_empty, "tool calls are implemented in /v1/chat/completions only"),
    "functions": (_empty, "the legacy functions parameter is not implemented; use tools"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calls are implemented in /v1/chat/completions only"),
    "function_call": (lambda v: v in (None, "none"), "the legacy function_call parameter is not implemented; use "
                      "tool_choice"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool),
                            "tool calls are implemented in /v1/chat/completions only"),
    "logit_bias": (_empty, "logit_bias is not implemented"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is implemented"),
    "audio": (lambda v: v is None, "audio output is not implemented"),
    "prediction": (lambda v: v is None, "predicted outputs are not implemented"),
    "reasoning_effort": (lambda v: v is None, "reasoning effort is not implemented"),
    "verbosity": (lambda v: v is None, "verbosity is not implemented"),
    "web_search_options": (lambda v: v is None, "web search is not implemented"),
    "best_of": (lambda v: v in (None, 1), "best_of is not implemented (use n)"),
}


class RequestBody(BaseModel):
    # unknown fields are a 400 naming them (see NOT_IMPLEMENTED); strict: a value of the wrong JSON type is a 400
    # naming the field, never coerced (`max_tokens: true` is not 1, `"5"` is not 5, `stream: 1` is not true)
    model_config = ConfigDict(extra="forbid", strict=True)


def _temperature(v: float) -> float:
    if 0.0 < v < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return v


class StreamOptions(RequestBody):
    include_usage: bool = False  # a last chunk with `usage` (and `usage: null` on the others)


class JsonSchemaFormat(RequestBody):
    """response_format.json_schema: the schema every choice's text follows (constrained decoding, whatever
    `strict` says: lmforge always enforces the schema it is given)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's response_format: text (free), json_object (any JSON object) or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> tuple[str, Any] | None:
        """(kind, spec) for decoding.constraints, or None for free text; a 400 when the schema is missing."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ("json_object", None)
        if self.json_schema is None:
            raise ApiError(400, "response_format type json_schema needs a 'json_schema' object",
                           "response_format.json_schema", "invalid_value")
        schema = self.json_schema.schema_
        return ("json_schema", {} if schema is None else schema)


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
    seed: int | None = SEED  # with n > 1, the n choices are drawn together: the same seed gives the same n
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None  # json_object / json_schema: constrained decoding
    # lmforge extension: prompt-lookup speculative decoding of a lone greedy request (same tokens either way)
    speculative: Literal["auto", "off", "prompt-lookup"] = "auto"

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
        """Values OpenAI has and lmforge does not do: a 400 that says so, rather than silently ignoring them."""
        if self.frequency_penalty or self.presence_penalty:
            raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty",
                           "frequency_penalty" if self.frequency_penalty else "presence_penalty",
                           "unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options",
                           "invalid_value")


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class FunctionCall(RequestBody):
    name: str = Field(min_length=1, max_length=64)
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(RequestBody):
    """A tool call of an earlier assistant message, sent back with the conversation."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant message with tool_calls
    name: str | None = None  # passed to the chat template (most templates do not use it)
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(RequestBody):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # lmforge enforces the schema when tool_choice forces a call, whatever this says


class ToolDef(RequestBody):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per reply

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ApiError(400, f"messages[{i}] has no content", f"messages.{i}.content", "invalid_value")
            if m.tool_calls is not None and m.role != "assistant":
                raise ApiError(400, f"messages[{i}]: only assistant messages carry tool_calls",
                               f"messages.{i}.tool_calls", "invalid_value")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            raise ApiError(400, "two tools have the same function name", "tools", "invalid_value")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ApiError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ApiError(400, f"tool_choice names function '{choice.function.name[:64]}', which is not "
                                    "among tools", "tool_choice", "invalid_value")
            if self.response_format is not None and self.response_format.type != "text":
                raise ApiError(400, "response_format cannot be combined with a forced tool_choice", "tool_choice",
                               "invalid_value")

    def tool_list(self) -> list[dict] | None:
        """The offered tools as plain dicts (the chat template's `tools`), or None when tools are off."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def top_logprobs_k(self) -> int | None:
        """None: no logprobs; k >= 0: each token's log-probability and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (as lm-evaluation-harness sends)
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool = False  # the prompt comes back in front of the text (and its tokens' logprobs, first one null)
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # completions: the number of alternatives

    def unsupported(self) -> None:
        super().unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens 0 generates nothing: it needs echo: true (to score the prompt)",
                           "max_tokens", "invalid_value")
        if self.max_tokens == 0 and self.stream:
            raise ApiError(400, "max_tokens 0 (prompt scoring) is not streamed: send stream: false", "stream",
                           "unsupported_value")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one entry per prompt: strings, or lists of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def top_logprobs_k(self) -> int | None:
        return self.logprobs


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
    speculative: Literal["auto", "off", "prompt-lookup"] = "auto"  # as SamplingFields.speculative

    _check_temperature = field_validator("temperature")(_temperature)


class SummarizeRequest(TaskRequest):
    text: str = Field(min_length=1)
    sentences: int | None = Field(None, ge=1, le=100)  # the prompt's budget (None: the trained one, or "two or three")


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


def _drop_no_ops(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Undeclared top-level fields: a no-op value of a known OpenAI parameter is dropped, anything else is a
    400 naming the field (an unimplemented parameter says so; an unknown one is called unknown)."""
    declared = {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)
    out = {}
    for key, value in data.items():
        if key in declared:
            out[key] = value
            continue
        if key not in NOT_IMPLEMENTED:
            raise ApiError(400, f"unknown parameter '{key[:80]}' (not an lmforge or OpenAI field of this "
                                "endpoint)", key[:80], "unknown_parameter")
        accept, why = NOT_IMPLEMENTED[key]
        if not accept(value):
            raise ApiError(400, f"'{key}' is not supported: {why}", key, "unsupported_parameter")
    return out


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
    data = _drop_no_ops(data, model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
