"""Tool calling for /v1/chat/completions: tools into the prompt, the model's tool-call text back into `tool_calls`.

Each model family writes tool calls its own way; the format is read from the chat template:
- "hermes"  (Qwen2.5, Hermes, SmolLM3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call;
- "smollm2" (SmolLM2, ChatML templates without tool support): a JSON list in one tag,
  `<tool_call>[{"name": ..., "arguments": ...}]</tool_call>` (the hermes parser reads both);
- "llama3_json" (Llama 3.x): `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`, several
  separated by `;`;
- "pythonic" (Gemma 2/3, which have no tool tokens; Google's recommended prompt): `[get_weather(city="Paris"), f()]`,
  optionally in a ```tool_code fence, parsed with `ast` (literal values only);
- "gemma4" (Gemma 4's template): `<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>`;
- "mistral" (Mistral 7B v0.3 / Nemo): `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, and Mistral Small 3.2 /
  Devstral's `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` per call; without the marker (a tokenizer that drops it) a
  reply that is wholly a JSON list of calls reads too. Its templates want 9-character alphanumeric call ids.

A template that reads `tools` (Qwen2.5, Llama 3.1, Hermes) renders them itself, with `tool_calls` on assistant
messages (arguments as objects, as transformers expects) and `role: "tool"` results. For a template that does not,
lmforge writes the tool list and the format into the system message, assistant tool calls as the model would have
written them, and tool results as user turns (Gemma's template refuses any role but user/assistant).

tool_choice "required" or a named function: the reply is constrained (decoding/constraints.py) to JSON of the calls
(`forced_schema`), whatever the family's format, so the arguments always parse and follow the function's schema.
A call naming a function the request did not offer is not a call: that text stays content. Streaming (calls as
OpenAI's deltas, arguments as they are generated): serve/tool_stream.py.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lmforge.serve.errors import ApiError
from lmforge.tokenizer.chat_template import template_variables

FORMATS = ("hermes", "smollm2", "llama3_json", "pythonic", "gemma4", "mistral")
_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```(?:tool_code|python|json)?\s*\n?(.*?)\n?```$", re.S)


@dataclass
class Call:
    """One parsed tool call: the function's name and its arguments as a JSON object string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


# ---- which format, and how tools reach the prompt -------------------------------------------------------------
def detect_format(template: str | None) -> str:
    """The tool-call format of a chat template's family (see the module docstring)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|tool_call>" in t:
        return "gemma4"
    if "<tool_call>" in t:
        return "hermes"
    if "<|python_tag|>" in t or "<|start_header_id|>" in t:
        return "llama3_json"
    if "<start_of_turn>" in t:
        return "pythonic"
    return "smollm2"


def template_renders_tools(template: str | None) -> bool:
    """Whether the chat template reads `tools` (then it renders them itself)."""
    return bool(template) and "tools" in template_variables(template)


def instructions(fmt: str, tools: list[dict]) -> str:
    """The system text that tells a model without template tool support what it may call, and how."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if fmt == "pythonic":
        return ("You can call functions. To call any, reply with nothing but a Python list of calls with keyword "
                "arguments, like [func_name1(param1=value1, param2=value2), func_name2(param=value)].\n"
                f"The functions, as JSON:\n{listing}")
    if fmt == "llama3_json":
        return ("You can call functions. To call one, reply with nothing but a JSON object "
                '{"name": function name, "parameters": object of argument names and values}.\n'
                f"The functions, as JSON:\n{listing}")
    if fmt == "hermes":
        return ("You can call functions. The function signatures, within <tools></tools>:\n"
                f"<tools>\n{listing}\n</tools>\nFor each call, reply with a JSON object of the function name and "
                'arguments within <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, '
                '"arguments": <args-json-object>}\n</tool_call>')
    if fmt == "mistral":
        return ("You can call functions. To call any, reply with nothing but [TOOL_CALLS] and a JSON list of calls: "
                '[TOOL_CALLS][{"name": "func_name1", "arguments": {"argument1": "value1"}}].\n'
                f"The functions, as JSON:\n{listing}")
    return ("You can call functions. The functions, within <tools></tools>:\n"
            f"<tools>{listing}</tools>\nTo call functions, reply with nothing but a JSON list of calls within "
            '<tool_call></tool_call> tags: <tool_call>[{"name": "func_name1", "arguments": {"argument1": '
            '"value1"}}]</tool_call>')


def write_calls(fmt: str, calls: list[dict]) -> str:
    """Earlier assistant tool calls ({"name", "arguments": object}) as the model itself would have written them."""
    if fmt == "pythonic":
        return "[" + ", ".join(f"{c['name']}(" + ", ".join(f"{k}={v!r}" for k, v in c["arguments"].items()) + ")"
                               for c in calls) + "]"
    if fmt == "llama3_json":
        return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls)
    if fmt == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps(calls)
    return f"<tool_call>{json.dumps(calls)}</tool_call>"


def call_arguments(raw: str | None, where: str) -> dict:
    """An assistant message's tool-call arguments (a JSON string) -> the object templates expect."""
    try:
        value = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, RecursionError):
        raise ApiError(400, f"'{where}' is not valid JSON (or nested too deeply)", where, "invalid_value") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{where}' must be a JSON object", where, "invalid_value")
    return value


def prompt_messages(messages: list, template: str | None, tools: list[dict] | None) -> tuple[list[dict], bool]:
    """Request messages (schemas.ChatMessage) -> the dicts the chat template gets, and whether to pass it `tools`.

    Native (the template reads `tools`): tool calls and tool results go to the template as transformers gives them.
    Otherwise tools are described in the system message and calls/results become plain turns (module docstring).
    """
    native = template_renders_tools(template)
    fmt = detect_format(template)
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        calls = [{"id": c.id, "name": c.function.name,
                  "arguments": call_arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments")}
                 for j, c in enumerate(m.tool_calls or ())]
        if native:
            d: dict[str, Any] = {"role": role, "content": text}
            if m.name is not None:
                d["name"] = m.name
            if calls:
                d["tool_calls"] = [{"id": c["id"], "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
            continue
        if role == "tool":
            wrapped = f"```tool_output\n{text}\n```" if fmt == "pythonic" else \
                f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1].get("lmforge_tool_results"):  # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + wrapped
            else:
                out.append({"role": "user", "content": wrapped, "lmforge_tool_results": True})
            continue
        if calls:
            text = (text + "\n" if text else "") + write_calls(fmt, [{"name": c["name"], "arguments": c["arguments"]}
                                                                     for c in calls])
        if role == "user" and out and out[-1].get("lmforge_tool_results"):  # keep user/assistant alternating
            out[-1]["content"] += "\n\n" + text
            out[-1]["lmforge_tool_results"] = False
            continue
        d = {"role": role, "content": text}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    for d in out:
        d.pop("lmforge_tool_results", None)
    if tools and not native:
        note = instructions(fmt, tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{note}" if out[0]["content"] else note
        elif fmt == "pythonic" and out and out[0]["role"] == "user":  # Gemma 2's template refuses a system turn
            out[0]["content"] = f"{note}\n\n{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": note})
    return out, native and bool(tools)


# ---- forced calls (tool_choice required / named) -------------------------------------------------------------
def _call_schema(fn: dict) -> dict:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_schema(tools: list[dict], name: str | None, parallel: bool) -> dict:
    """The JSON schema a forced reply follows: one call object for a named function; else a list of calls (at
    least one; at most one unless parallel_tool_calls) of any offered function."""
    fns = [t["function"] for t in tools]
    if name is not None:
        return _call_schema(next(f for f in fns if f["name"] == name))
    one = _call_schema(fns[0]) if len(fns) == 1 else {"anyOf": [_call_schema(f) for f in fns]}
    return {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}


# ---- parsing the model's reply --------------------------------------------------------------------------------
def _as_call(obj: Any, names: set[str]) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str, names: set[str]) -> list[Call] | None:
    """One JSON value (an object or a list of objects) that is wholly calls -> them; anything else -> None."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # not JSON, or nested past Python's stack
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v, names) for v in items]
    return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]


def _llama_calls(text: str, names: set[str]) -> list[Call] | None:
    """`{...}; {...}` (or a JSON list) after an optional <|python_tag|> -> calls, if that is all the text is."""
    text = text.strip().removeprefix("<|python_tag|>").strip()
    if not text.startswith(("{", "[")):
        return None
    whole = _json_calls(text, names)
    if whole is not None:
        return whole
    dec, pos, calls = json.JSONDecoder(), 0, []
    while pos < len(text):
        try:
            obj, end = dec.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            return None
        call = _as_call(obj, names)
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def _python_calls(text: str, names: set[str]) -> list[Call] | None:
    """`[f(a=1), g(b="x")]` (or one bare call), literal keyword arguments only -> calls."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text or len(text) > 100_000:
        return None
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    calls = []
    for n in nodes:
        if not isinstance(n, ast.Call) or not isinstance(n.func, ast.Name) or n.args or n.func.id not in names:
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in n.keywords if k.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        if len(args) != len(n.keywords):
            return None
        calls.append(Call(n.func.id, json.dumps(args, ensure_ascii=False)))
    return calls or None


_G4_CALL = re.compile(r"(?:<\|tool_call>)?\s*call:([A-Za-z0-9_.-]+)\{")
_G4_QUOTE = '<|"|>'


def _g4_value(s: str, i: int) -> tuple[Any, int]:
    """One Gemma 4 argument value at s[i:] -> (value, end): <|"|>text<|"|> strings, {key:value,...} objects,
    [...] lists, JSON numbers / true / false / null, and (tokenizers that drop <|"|>) bare text as a string."""
    if s.startswith(_G4_QUOTE, i):
        end = s.index(_G4_QUOTE, i + len(_G4_QUOTE))
        return s[i + len(_G4_QUOTE): end], end + len(_G4_QUOTE)
    if s.startswith("{", i):
        out, i = {}, i + 1
        while not s.startswith("}", i):
            colon = s.index(":", i)
            key = s[i:colon].strip().replace(_G4_QUOTE, "")
            out[key], i = _g4_value(s, colon + 1)
            i += 1 if s.startswith(",", i) else 0
        return out, i + 1
    if s.startswith("[", i):
        items, i = [], i + 1
        while not s.startswith("]", i):
            v, i = _g4_value(s, i)
            items.append(v)
            i += 1 if s.startswith(",", i) else 0
        return items, i + 1
    end = i
    while end < len(s) and s[end] not in ",}]":
        end += 1
    raw = s[i:end]
    try:
        return json.loads(raw), end
    except json.JSONDecodeError:
        return raw, end


def _gemma4_calls(text: str, names: set[str]) -> tuple[str | None, list[Call]] | None:
    """Gemma 4's `<|tool_call>call:name{key:value,...}<tool_call|>` calls -> (the text around them, calls)."""
    calls, rest, pos = [], [], 0
    while (m := _G4_CALL.search(text, pos)) is not None:
        if m.group(1) not in names:
            return None
        try:
            args, end = _g4_value(text, m.end() - 1)
        except (ValueError, IndexError, RecursionError):  # unbalanced, or nested past Python's stack
            return None
        rest.append(text[pos: m.start()])
        calls.append(Call(m.group(1), json.dumps(args, ensure_ascii=False)))
        pos = end + len("<tool_call|>") if text.startswith("<tool_call|>", end) else end
    if not calls:
        return None
    rest.append(text[pos:])
    content = "".join(rest).strip()
    return content or None, calls


_MISTRAL_ARGS = re.compile(r"\s*([A-Za-z0-9_.-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")


def new_id(fmt: str) -> str:
    """A call id: OpenAI's `call_...`, or the 9 alphanumeric characters Mistral's templates insist on."""
    return uuid.uuid4().hex[:9] if fmt == "mistral" else f"call_{uuid.uuid4().hex[:24]}"


def _mistral_calls(text: str, names: set[str]) -> tuple[str | None, list[Call]] | None:
    """`[TOOL_CALLS][{...}, ...]` or `[TOOL_CALLS]name[ARGS]{...}` (repeated) after optional content; without
    the marker, a reply that is wholly a JSON list of calls -> (the content before the calls, calls)."""
    at = text.find("[TOOL_CALLS]")
    if at < 0:
        calls = _json_calls(text.strip(), names) if text.strip().startswith("[") else None
        return (None, calls) if calls else None
    content, calls = text[:at].strip() or None, []
    for part in text[at:].split("[TOOL_CALLS]")[1:]:
        m = _MISTRAL_ARGS.match(part)
        if m is None:  # the JSON list form
            found = _json_calls(part.strip(), names)
            if found is None:
                return None
            calls += found
            continue
        if m.group(1) not in names:
            return None
        try:
            args, end = json.JSONDecoder().raw_decode(part, m.end())
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(args, dict) or part[end:].strip():
            return None
        calls.append(Call(m.group(1), json.dumps(args, ensure_ascii=False)))
    for c in calls:
        c.id = new_id("mistral")
    return (content, calls) if calls else None


def parse(fmt: str, text: str, names: set[str]) -> tuple[str | None, list[Call]]:
    """A reply -> (its content, None when empty; the tool calls in it). Unparsable call text stays content."""
    if fmt == "forced":
        calls = _json_calls(text.strip(), names)
        return (None, calls) if calls else (text, [])
    if fmt in ("hermes", "smollm2"):
        calls: list[Call] = []
        for body in _TAG.findall(text):
            found = _json_calls(body.strip(), names)
            if found is None:
                return text, []
            calls += found
        if not calls:
            return text, []
        rest = _TAG.sub("", text).strip()
        return rest or None, calls
    if fmt == "gemma4":
        got = _gemma4_calls(text, names)
        return got if got is not None else (text, [])
    if fmt == "mistral":
        got = _mistral_calls(text, names)
        return got if got is not None else (text, [])
    found = _llama_calls(text, names) if fmt == "llama3_json" else _python_calls(text, names)
    return (None, found) if found else (text, [])


# ---- one request's plan -----------------------------------------------------------------------------------------
@dataclass
class ToolPlan:
    """What a chat request with tools needs: how to read the reply, and the forced-call schema (if any)."""

    fmt: str  # one of FORMATS, or "forced" (the reply is JSON of the calls)
    names: set[str]
    parallel: bool  # parallel_tool_calls: false keeps the first call only
    forced: dict | None = None  # the JSON schema a forced reply is constrained to
    family: str = ""  # the template's format (a forced plan's too): it decides the ids' form (new_id)

    @classmethod
    def of(cls, body, template: str | None) -> ToolPlan | None:
        """None when the request offers no tools (or tool_choice is "none")."""
        tools = body.tool_list()
        if not tools:
            return None
        names = {t["function"]["name"] for t in tools}
        parallel = body.parallel_tool_calls is not False
        choice = body.tool_choice
        if choice == "required" or (choice is not None and not isinstance(choice, str)):
            name = None if isinstance(choice, str) else choice.function.name
            return cls("forced", names, parallel, forced_schema(tools, name, parallel), detect_format(template))
        fmt = detect_format(template)
        return cls(fmt, names, parallel, family=fmt)

    def reply(self, text: str) -> tuple[str | None, list[Call]]:
        content, calls = parse(self.fmt, text, self.names)
        calls = calls if self.parallel else calls[:1]
        for c in calls:
            c.id = new_id(self.family or self.fmt)
        return content, calls


async def chat_ids(generator, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Render (with `tools` when the template takes them) and encode, off the event loop."""
    def render() -> list[int]:
        if tools is not None:
            text = generator.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        else:
            text = generator.format_chat(messages)
        return generator.tokenizer.encode(text, add_special_tokens=False)

    return await asyncio.to_thread(render)
