"""Streamed tool calls (issue 37): OpenAI's deltas per family format, assembled from pieces of any size, equal to
the non-streamed reply's calls (tools.parse); JSON formats send a call's name early and its arguments in several
pieces as they are generated. The round trip through the official client is in test_serve_tools.py."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")

from test_serve_tools import NAMES  # noqa: E402

from lmforge.serve import tool_stream, tools  # noqa: E402


# ---- streaming --------------------------------------------------------------------------------------------------
def feed_all(stream: tool_stream.ToolStream, text: str, size: int
             ) -> tuple[str, str, list[tuple[str, str]], list[dict]]:
    """Feed `text` in pieces of `size` -> (content streamed, content at the end, the calls assembled from their
    deltas as (name, arguments), the deltas)."""
    out, deltas = "", []
    for i in range(0, len(text), size):
        out += stream.feed(text[i: i + size])
        deltas += stream.deltas()
    tail, last, _ = stream.finish()
    deltas += last
    calls: dict[int, list[str]] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], ["", ""])
        if "id" in d:
            assert d["type"] == "function" and d["function"]["arguments"] == "" and not c[0]
            c[0] = d["function"]["name"]
        else:
            assert c[0], "arguments before the call's head"
            c[1] += d["function"]["arguments"]
    return out, tail, [(n, a) for _, (n, a) in sorted(calls.items())], deltas


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_stream_releases_content_and_holds_calls(size):
    text = 'Checking.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("hermes", NAMES), text, size)
    assert out == "Checking.\n" and tail == "" and [c[0] for c in calls] == ["add"]
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("hermes", NAMES), "a <tool_ thing, no call", size)
    assert out + tail == "a <tool_ thing, no call" and calls == []
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("pythonic", NAMES), "[add(a=1, b=2)]", size)
    assert out == "" and tail == "" and calls[0][0] == "add"
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("pythonic", NAMES), "[not a call] at all", size)
    assert out + tail == "[not a call] at all" and calls == []
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("llama3_json", NAMES), "Paris is sunny {today}", size)
    assert out + tail == "Paris is sunny {today}" and calls == []


# (format, reply): each parses to calls; the streamed deltas must assemble to exactly tools.parse's calls
STREAMED = [
    ("hermes", 'Let me see.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Saint-\u00c9tienne, '
               'la \\"Loire\\" \\ud83d\\ude00\\n/\\/", "unit":"c", "days": [1, 2.50, -0, 1e3, 1E-2, true, '
               'null], "deep": {"x": {"y": []}, "z": {}}}}\n</tool_call>\n<tool_call>\n{"name": "add", '
               '"arguments": {"a": 10, "b": 2}}\n</tool_call> done'),
    ("smollm2", '<tool_call>[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather","arguments":'
                '{"city":"Oslo","unit":"f"}}]</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>'),  # the name after
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'),  # as a string
    ("hermes", '<tool_call>{"name": "get_weather"}</tool_call>'),  # no arguments: {}
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}; '
                    '{"name": "add", "parameters": {"a": 3, "b": 4}}'),
    ("llama3_json", '  [{"name": "add", "parameters": {"a": 3, "b": 4}}]'),
    ("forced", '[{"name": "get_weather", "arguments": {"city": "Lima", "unit": "c"}}]'),
    ("forced", '{"name": "add", "arguments": {"a": 5, "b": 6}}'),
    ("pythonic", '```tool_code\n[get_weather(city="Oslo", unit="c"), add(a=1, b=2)]\n```'),
    ("gemma4", '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,unit:<|"|>c<|"|>}<tool_call|>'
               '<|tool_call>call:add{a:1,b:2}<tool_call|>'),
    ("mistral", 'On it. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}, '
                '"id": "abcdefghi"}]'),
    ("mistral", '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "c"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}'),
]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
@pytest.mark.parametrize("fmt,text", STREAMED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(STREAMED)])
def test_streamed_calls_assemble_to_the_parsed_ones(fmt, text, size):
    """The deltas of a streamed reply concatenate to exactly what the non-streamed reply holds (tools.parse:
    re-serialised arguments, ids aside), and JSON formats send a call's arguments in several pieces as they come."""
    content, parsed = tools.parse(fmt, text, NAMES)
    assert parsed
    out, tail, calls, deltas = feed_all(tool_stream.ToolStream(fmt, NAMES), text, size)
    assert calls == [(c.name, c.arguments) for c in parsed]
    assert (out + tail).split() == (content or "").split()  # the text around the calls (its spacing may differ)
    # JSON with the name before an arguments object: the head goes out before the call's text is complete, and
    # the arguments in several pieces (a name after them, or arguments as a string, wait for the end of the call)
    if fmt in tool_stream.ToolStream.JSON and re.search(r'"name":\s*"\w+",\s*"(arguments|parameters)":\s*\{', text):
        if size <= 2 and len(json.loads(parsed[0].arguments)) > 1:
            assert sum(1 for d in deltas if d["index"] == 0 and "id" not in d) >= 3, "arguments in one piece"
        s = tool_stream.ToolStream(fmt, NAMES)
        cut = text.index(parsed[0].name) + len(parsed[0].name) + 30
        s.feed(text[:cut])
        assert any("id" in d for d in s.deltas())


def test_streamed_call_names_a_function_not_offered_or_breaks_off():
    s = tool_stream.ToolStream("hermes", NAMES)
    text = '<tool_call>{"name": "rm_rf", "arguments": {"path": "/"}}</tool_call>'
    assert s.feed(text) == "" and s.deltas() == []
    assert s.finish() == (text, [], None)  # not offered: content, as the non-streamed reply
    s = tool_stream.ToolStream("forced", NAMES)
    s.feed('[{"name": "add", "arguments": {"a": 1')
    assert [d.get("function", {}).get("name") for d in s.deltas()][0] == "add"
    _, last, kind = s.finish()
    assert kind == "partial"  # cut by max_tokens: the call that went out stays a call, its arguments as far as
    # they got (the route says finish_reason "length")


def test_streamed_deltas_are_openai_shaped():
    from lmforge.serve.openai_routes import tool_chunks

    plan = tools.ToolPlan("hermes", NAMES, parallel=True)
    sent: list[dict] = []

    def chunk(i, delta, finish=None, lps=None):
        sent.append({"index": i, "delta": delta, "finish_reason": finish})
        return "x"

    text_chunk, end_chunk = tool_chunks(plan, 1, chunk)
    for piece in ["Hm", "m. <tool", '_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
                  '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']:
        text_chunk(0, piece, None)
    end_chunk(0, "stop")
    assert "".join(s["delta"].get("content", "") for s in sent) == "Hmm. "
    deltas = [tc for s in sent for tc in s["delta"].get("tool_calls", [])]
    assert [d["index"] for d in deltas] == [0, 0, 1, 1]
    assert deltas[0]["function"] == {"name": "add", "arguments": ""} and deltas[0]["type"] == "function"
    assert json.loads(deltas[1]["function"]["arguments"]) == {"a": 1, "b": 2} and "id" not in deltas[1]
    assert sent[-1]["finish_reason"] == "tool_calls"
    # parallel_tool_calls false: the first call only
    sent.clear()
    text_chunk, end_chunk = tool_chunks(tools.ToolPlan("hermes", NAMES, parallel=False), 1, chunk)
    text_chunk(0, '<tool_call>[{"name": "add", "arguments": {}}, {"name": "add", "arguments": {}}]</tool_call>', None)
    end_chunk(0, "stop")
    assert len([tc for s in sent for tc in s["delta"].get("tool_calls", [])]) == 2  # one call: head + arguments


@pytest.mark.parametrize("size", [1, 4, 50])
def test_gemma4_streamed(size):
    text = 'Sure.<|tool_call>call:get_weather{city:<|"|>San Jose, CA<|"|>,unit:<|"|>f<|"|>}<tool_call|>' \
           "<|tool_call>call:add{a:1,b:[2,{x:true}]}<tool_call|>"
    out, tail, calls, _ = feed_all(tool_stream.ToolStream("gemma4", NAMES), text, size)
    assert out == "Sure." and [c[0] for c in calls] == ["get_weather", "add"]
