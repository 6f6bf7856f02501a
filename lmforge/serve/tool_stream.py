"""Streaming tool calls: content deltas until the reply may be a tool call, then each call as OpenAI streams it (a
first delta with index, id, type and function.name and arguments "", then deltas that append argument text).

Where a family writes its calls as JSON (hermes / Qwen `<tool_call>` objects, SmolLM2's list in one tag, Llama 3's
`{"name", "parameters"}`, Mistral's `[TOOL_CALLS][...]`, a forced reply's JSON), `_JsonCalls` reads the text as
it grows, so a call's name goes out once its object names it and its arguments follow as they are generated,
re-written piece by piece as `json.dumps(arguments, ensure_ascii=False)` writes them: the deltas concatenate to the
non-streamed reply's `arguments`. Gemma's formats (pythonic lists, Gemma 4's `call:name{...}`) are not JSON: each
call goes out whole once its text is complete; so do Mistral Small 3.2's `[TOOL_CALLS]name[ARGS]{...}` calls, at
the end. Why one delta per completed JSON piece and not raw text: a streamed call must end equal
to the non-streamed one, which tools.parse re-serialises (spacing, escapes, number forms).

Once a call's name has gone out it stays a call: a reply cut by max_tokens (or whose JSON breaks later) keeps it
with the arguments as far as they got, where the non-streamed reply would return that text as content.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from lmforge.serve.tools import Call, new_id, parse

_LITERAL = set("-+0123456789.eEtrufalsnNIiy")  # numbers, true / false / null, NaN / Infinity (json.loads takes both)
_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "/", "b": "\\b", "f": "\\f", "n": "\\n", "r": "\\r", "t": "\\t"}


class _JsonCalls:
    """Call objects ({"name": ..., "arguments" | "parameters": {...}}) written as JSON, alone, in a list, or several
    separated by `;` / whitespace, read a character at a time -> per call its name (once known) and its arguments'
    canonical text so far (`calls[j]["args"]`, a list of pieces)."""

    def __init__(self, names: set[str], first_index: int = 0) -> None:
        self.names = names
        self.stack: list[list[Any]] = []  # per open container: [kind "{"|"[", expecting, key, keys seen]
        self.calls: list[dict[str, Any]] = []
        self.first = first_index  # the index of this reader's first call in the reply
        self.cur: dict[str, Any] | None = None  # the call whose object is open
        self.call_depth: int | None = None  # containers around a call object: 0 (bare) or 1 (in a list)
        self.sink: list[str] | None = None  # where canonical text goes: the current call's arguments
        self.sink_depth = -1
        self.s: str | None = None  # a string's raw text in progress, opening quote included
        self.s_sent = 0  # its canonical characters already written (quote included)
        self.s_esc = ""  # an escape in progress
        self.s_hold = False  # a \\u escape: the rest of the string is written when it closes
        self.tok = ""  # a number or literal in progress
        self.bad = False  # not JSON (from here on nothing more is read)

    # ---- the lexer -------------------------------------------------------------------------------------------
    def feed(self, text: str) -> None:
        for ch in text:
            if self.bad:
                return
            self._char(ch)

    def _out(self, piece: str) -> None:
        if self.sink is not None:
            self.sink.append(piece)

    def _expect_value(self) -> bool:
        if not self.stack:
            return True
        return self.stack[-1][1] == "value"

    def _char(self, ch: str) -> None:
        if self.s is not None:
            self._string_char(ch)
            return
        if self.tok:
            if ch in _LITERAL:
                self.tok += ch
                return
            self._end_literal()
            if self.bad:
                return
        if ch in " \t\r\n":
            return
        if ch == '"':
            top = self.stack[-1] if self.stack else None
            if top is not None and top[0] == "{" and top[1] == "key":
                self.s = '"'
            elif self._expect_value():
                self._value_start('"')
                self.s = '"'
            else:
                self.bad = True
                return
            self.s_sent, self.s_esc, self.s_hold = 1, "", False
            self._out('"')
        elif ch in "{[":
            if not self._expect_value():
                self.bad = True
                return
            self._value_start(ch)
            self._out(ch)
            self.stack.append([ch, "key" if ch == "{" else "value", None, set(), 0])
        elif ch in "}]":
            top = self.stack[-1] if self.stack else None
            if top is None or top[0] != ("{" if ch == "}" else "[") or \
                    not (top[1] == "sep" or (top[4] == 0 and top[1] in ("key", "value"))):
                self.bad = True
                return
            self.stack.pop()
            self._out(ch)
            self._value_end(None)
        elif ch == ",":
            top = self.stack[-1] if self.stack else None
            if top is None or top[1] != "sep":
                self.bad = True
                return
            top[1] = "key" if top[0] == "{" else "value"
            self._out(", ")
        elif ch == ":":
            top = self.stack[-1] if self.stack else None
            if top is None or top[0] != "{" or top[1] != "colon":
                self.bad = True
                return
            top[1] = "value"
            self._out(": ")
        elif ch == ";" and not self.stack:
            return  # Llama 3: calls separated by `;`
        elif ch in _LITERAL and self._expect_value():
            self._value_start("0")
            self.tok = ch
        else:
            self.bad = True

    def _string_char(self, ch: str) -> None:
        self.s += ch
        if self.s_hold:
            if self.s_esc:
                self.s_esc = ""
            elif ch == "\\":
                self.s_esc = ch
            elif ch == '"':
                self._end_string()
            return
        if self.s_esc:
            self.s_esc = ""
            if ch == "u":
                self.s_hold = True  # \\uXXXX (perhaps half of a surrogate pair): written whole at the end
            elif ch in _SIMPLE_ESCAPES:
                piece = _SIMPLE_ESCAPES[ch]
                self.s_sent += len(piece)
                self._out(piece)
            else:
                self.bad = True
            return
        if ch == "\\":
            self.s_esc = ch
        elif ch == '"':
            self._end_string()
        elif ch < " ":
            self.bad = True  # json.loads refuses a raw control character in a string
        else:
            self.s_sent += 1
            self._out(ch)

    def _end_string(self) -> None:
        raw, self.s = self.s, None
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            self.bad = True
            return
        canon = json.dumps(value, ensure_ascii=False)
        self._out(canon[self.s_sent:])  # what a held \\u escape left, and the closing quote
        top = self.stack[-1] if self.stack else None
        if top is not None and top[0] == "{" and top[1] == "key":
            top[3].add(value)
            top[2], top[1] = value, "colon"
            return
        self._value_end(value)

    def _end_literal(self) -> None:
        tok, self.tok = self.tok, ""
        try:
            value = json.loads(tok)
        except (json.JSONDecodeError, RecursionError):
            self.bad = True
            return
        self._out(json.dumps(value))
        self._value_end(value)

    # ---- calls ----------------------------------------------------------------------------------------------
    def _value_start(self, kind: str) -> None:
        depth = len(self.stack)
        if depth == 0 and self.call_depth is None:
            self.call_depth = 1 if kind == "[" else 0
        if kind == "{" and depth == self.call_depth and (depth == 0 or self.stack[0][0] == "["):
            self.cur = {"name": None, "args": None, "args_str": False, "closed": False,
                        "index": self.first + len(self.calls)}
            self.calls.append(self.cur)
            return
        top = self.stack[-1] if self.stack else None
        if self.cur is not None and self.sink is None and depth == (self.call_depth or 0) + 1 \
                and top is not None and top[0] == "{" and top[2] in ("arguments", "parameters") \
                and self.cur["args"] is None:
            if top[2] == "parameters" and "arguments" in top[3]:
                return
            self.cur["args"] = []
            if kind == "{":
                self.sink, self.sink_depth = self.cur["args"], depth
            elif kind == '"':
                self.cur["args_str"] = True  # arguments as a JSON string: decoded when it closes
            else:
                self.cur["args"] = None
                self.cur["not_call"] = True  # _as_call takes an object (or a string of one) only

    def _value_end(self, value: Any) -> None:
        depth = len(self.stack)
        if self.sink is not None and depth == self.sink_depth:
            self.sink = None
        cd = self.call_depth or 0
        if self.cur is not None and depth == cd + 1:
            key = self.stack[-1][2]
            if key == "name" and isinstance(value, str) and self.cur["name"] is None:
                self.cur["name"] = value
            elif key in ("arguments", "parameters") and self.cur["args_str"] and self.cur["args"] == []:
                self.cur["args_str"] = False
                try:
                    obj = json.loads(value)
                except (json.JSONDecodeError, RecursionError, TypeError):
                    obj = None
                if isinstance(obj, dict):
                    self.cur["args"].append(json.dumps(obj, ensure_ascii=False))
                else:
                    self.cur["args"], self.cur["not_call"] = None, True
        elif self.cur is not None and depth == cd:
            self.cur["closed"] = True
            if self.cur["args"] is None and not self.cur.get("not_call"):
                self.cur["args"] = ["{}"]  # no arguments: _as_call's {}
            self.cur = None
        if self.stack:
            top = self.stack[-1]
            top[1], top[4] = "sep", top[4] + 1

    def ready(self, j: int) -> bool:
        """Whether call j can go out: it names an offered function and its arguments began (or it closed)."""
        c = self.calls[j]
        return c["name"] in self.names and not c.get("not_call") and (c["args"] is not None or c["closed"]) \
            and not c["args_str"]


class ToolStream:
    """One reply's stream: `feed` -> content that can go out now; `deltas` -> tool-call deltas ready now;
    `finish` -> (content still to go out, the last deltas, what the calls are: see `finish`)."""

    # per format: markers a call may start with at the reply's start, and markers that start one anywhere
    START = {"llama3_json": ("<|python_tag|>", "{", "["), "pythonic": ("[", "```"), "gemma4": ("call:",),
             "mistral": ("[",)}
    ANYWHERE = {"hermes": ("<tool_call>",), "smollm2": ("<tool_call>",), "gemma4": ("<|tool_call>",),
                "mistral": ("[TOOL_CALLS]",)}
    JSON = ("hermes", "smollm2", "llama3_json", "forced", "mistral")

    def __init__(self, fmt: str, names: set[str], parallel: bool = True, family: str = "") -> None:
        """family: the template's format, which decides the form of the call ids (tools.new_id)."""
        self.fmt, self.names, self.parallel = fmt, names, parallel
        self.family = family or fmt
        self.held = ""  # text that may be (part of) a tool call
        self.free = fmt != "forced"  # content may still go out directly
        self.start, self.anywhere = self.START.get(fmt, ()), self.ANYWHERE.get(fmt, ())
        self.started = False  # some content went out: start markers no longer apply
        self.read = 0  # characters of `held` given to the incremental readers
        self.readers: list[_JsonCalls] = []  # hermes: one per <tool_call> tag
        self.in_tag = False
        self.sent: list[dict[str, Any]] = []  # calls that went out: {"id", "name", "args" (text sent)}
        self.whole = 0  # Gemma formats: calls sent whole so far
        self.free_form = False  # Mistral's name[ARGS]{...} form: the calls go out at the end

    # ---- content --------------------------------------------------------------------------------------------
    def feed(self, piece: str) -> str:
        """A new piece of text -> the content that can go out now."""
        if not self.free:
            self.held += piece
            return ""
        text = self.held + piece
        if not self.started and self.start:
            lead = text.lstrip()
            if not lead or any(m.startswith(lead) for m in self.start):
                self.held = text  # too short to tell
                return ""
            if lead.startswith(self.start):
                self.free, self.held = False, text
                return ""
        hits = [at for m in self.anywhere if (at := text.find(m)) >= 0]
        if hits:
            at = min(hits)
            self.free, self.held = False, text[at:]
            out = text[:at]
        else:  # hold a tail that may be the start of a marker
            keep = max((k for m in self.anywhere for k in range(min(len(text), len(m) - 1), 0, -1)
                        if m.startswith(text[-k:])), default=0)
            self.held, out = text[len(text) - keep:], text[: len(text) - keep]
        self.started = self.started or bool(out.strip())
        return out

    # ---- calls as they come -------------------------------------------------------------------------------
    def _read(self, final: bool = False) -> None:
        """Give the held text that is certain to the readers (JSON formats)."""
        if self.free or self.fmt not in self.JSON or self.free_form:
            return
        if self.fmt in ("hermes", "smollm2"):
            self._read_tags(final)
            return
        if not self.readers:
            lead = self.held.lstrip()
            marker = "[TOOL_CALLS]" if self.fmt == "mistral" else "<|python_tag|>"
            if not lead or marker.startswith(lead):
                return
            skip = len(self.held) - len(lead)
            if lead.startswith(marker):
                skip += len(marker)
                if self.fmt == "mistral":  # `[TOOL_CALLS]name[ARGS]{...}`: not one JSON value; parsed at the end
                    after = self.held[skip:].lstrip()
                    if not after:
                        return
                    if not after.startswith(("[", "{")):
                        self.free_form = True
                        return
            self.readers.append(_JsonCalls(self.names))
            self.read = skip
        self.readers[0].feed(self.held[self.read:])
        self.read = len(self.held)

    def _read_tags(self, final: bool) -> None:
        open_tag, close_tag = "<tool_call>", "</tool_call>"
        while True:
            rest = self.held[self.read:]
            if not self.in_tag:
                at = rest.find(open_tag)
                if at < 0:
                    return
                self.read += at + len(open_tag)
                first = sum(len(r.calls) for r in self.readers)
                self.readers.append(_JsonCalls(self.names, first))
                self.in_tag = True
                continue
            at = rest.find(close_tag)
            if at >= 0:
                self.readers[-1].feed(rest[:at])
                self.read += at + len(close_tag)
                self.in_tag = False
                continue
            keep = 0 if final else max((k for k in range(min(len(rest), len(close_tag) - 1), 0, -1)
                                        if close_tag.startswith(rest[-k:])), default=0)
            self.readers[-1].feed(rest[: len(rest) - keep])
            self.read += len(rest) - keep
            return

    def _calls_so_far(self) -> list[tuple[_JsonCalls, int]]:
        return [(r, j) for r in self.readers for j in range(len(r.calls))]

    def deltas(self) -> list[dict[str, Any]]:
        """Tool-call deltas that can go out now (OpenAI's shape: the head of a call, then argument text)."""
        out: list[dict[str, Any]] = []
        if self.free:
            return out
        if self.fmt not in self.JSON:
            return self._whole_calls(final=False)
        self._read()
        for k, (r, j) in enumerate(self._calls_so_far()):
            if k >= 1 and not self.parallel:
                break
            c = r.calls[j]
            if k == len(self.sent):
                if not r.ready(j):
                    break
                call = Call(c["name"], "", new_id(self.family))
                self.sent.append({"id": call.id, "name": c["name"], "args": ""})
                out.append(_head(k, call))
            s = self.sent[k]
            if c["args"]:
                text = "".join(c["args"])
                if len(text) > len(s["args"]) and text.startswith(s["args"]):
                    out.append(_args(k, text[len(s["args"]):]))
                    s["args"] = text
            if not c["closed"]:
                break
        return out

    def _whole_calls(self, final: bool) -> list[dict[str, Any]]:
        """Gemma formats: each call once its text is complete (at the end: whatever parses)."""
        text = self.held
        if not final:
            cut = text.rfind("<tool_call|>") + len("<tool_call|>") if self.fmt == "gemma4" else text.rfind(")")
            if cut <= 0:
                return []
            text = text[:cut]
            if self.fmt == "pythonic":  # a list still open: close it to parse the calls complete so far
                lead = text.lstrip().removeprefix("```tool_code").removeprefix("```python").lstrip()
                text = lead + "]" if lead.startswith("[") else lead
        _, calls = parse(self.fmt, text, self.names)
        out = []
        for k, c in enumerate(calls[self.whole:], start=self.whole):
            if k >= 1 and not self.parallel:
                break
            c.id = new_id(self.family)
            self.sent.append({"id": c.id, "name": c.name, "args": c.arguments})
            out += [_head(k, c), _args(k, c.arguments)]
            self.whole = k + 1
        return out

    # ---- the end ----------------------------------------------------------------------------------------------
    def finish(self) -> tuple[str, list[dict[str, Any]], str | None]:
        """At the end -> (content still to go out, the remaining tool-call deltas, "parsed" when the reply is calls
        as tools.parse reads it, "partial" when only calls that went out early are (their text broke off), None
        when there are none)."""
        if not self.held:
            return "", [], "partial" if self.sent else None
        if self.fmt in self.JSON:
            self._read(final=True)
            for r in self.readers:
                if r.tok:
                    r._end_literal()
        early = self.deltas() if self.fmt in self.JSON else []
        content, calls = parse(self.fmt, self.held, self.names)
        calls = calls if self.parallel else calls[:1]
        if not calls:
            if not self.sent:
                return self.held, [], None
            return "", early, "partial"  # a call that went out stays one (see the module docstring)
        if self.fmt not in self.JSON:
            return content or "", self._whole_calls(final=True), "parsed"
        out = early
        for k, c in enumerate(calls):
            if k < len(self.sent):
                s = self.sent[k]
                if c.arguments.startswith(s["args"]) and len(c.arguments) > len(s["args"]):
                    out.append(_args(k, c.arguments[len(s["args"]):]))
                    s["args"] = c.arguments
                continue
            c.id = new_id(self.family)
            out += [_head(k, c), _args(k, c.arguments)]
            self.sent.append({"id": c.id, "name": c.name, "args": c.arguments})
        return content or "", out, "parsed"


def _head(k: int, c: Call) -> dict[str, Any]:
    return {"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}


def _args(k: int, text: str) -> dict[str, Any]:
    return {"index": k, "function": {"arguments": text}}


def stream_chunks(plan, n: int, chunk: Callable[..., str]):
    """Streamed replies with tools (`plan`: a tools.ToolPlan) -> (text_chunk, end_chunk) for routes_common.stream_job:
    content deltas until the text may be a tool call, then the calls as OpenAI streams them, finish_reason
    "tool_calls" when there are any. `chunk(i, delta, finish=None, lps=None)` writes one SSE chunk of choice i."""
    streams = [ToolStream(plan.fmt, plan.names, plan.parallel, plan.family) for _ in range(n)]
    held: list[list] = [[] for _ in range(n)]  # logprobs of tokens whose text has not gone out yet

    def emit(i: int, content: str, deltas: list[dict[str, Any]]) -> list[str]:
        parts = []
        if content:
            lps, held[i] = held[i], []
            parts.append(chunk(i, {"content": content}, lps=lps))
        for d in deltas:  # the held tokens' logprobs go with the first delta
            lps, held[i] = held[i], []
            parts.append(chunk(i, {"tool_calls": [d]}, lps=lps or None))
        return parts

    def text_chunk(i: int, t: str, lps) -> str:
        held[i] += lps or []
        s = streams[i]
        return "".join(emit(i, s.feed(t), s.deltas()))

    def end_chunk(i: int, reason: str) -> str:
        tail, deltas, calls = streams[i].finish()
        parts = emit(i, tail, deltas)
        if held[i]:  # tokens whose text went nowhere (a stop string, markers): their logprobs still go out
            lps, held[i] = held[i], []
            parts.append(chunk(i, {"content": ""}, lps=lps))
        why = "tool_calls" if calls == "parsed" or (calls == "partial" and reason != "length") else reason
        return "".join(parts) + chunk(i, {}, why)

    return text_chunk, end_chunk
