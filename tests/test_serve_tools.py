"""Tool calling in /v1/chat/completions (issue 37): the parsers per family format, the prompt rendering (a template
that takes `tools`, checked against transformers' own rendering; and one that does not), streaming deltas, and a
round trip through the official openai client (tools -> tool_calls -> role tool -> final answer), streamed and not.

A tiny random model does not call tools on its own, so the round trip forces the call (tool_choice required /
named: constrained decoding); the parsing of free replies is tested on the parsers and the streaming helper.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lmforge.serve import tools  # noqa: E402
from lmforge.serve.schemas import ChatRequest  # noqa: E402

NAMES = {"get_weather", "add"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
_NUMBER = {"type": "integer", "minimum": 0, "maximum": 99}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": _NUMBER, "b": _NUMBER}, "required": ["a", "b"],
                   "additionalProperties": False}}}

# a Hermes/Qwen-style template that renders tools, assistant tool_calls and tool results itself
HERMES = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\nCall with <tool_call>"
    "{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
# a Mistral-style template (after Mistral Nemo's): [AVAILABLE_TOOLS], [TOOL_CALLS] with the calls as a JSON list,
# [TOOL_RESULTS]; like the real ones it refuses call ids that are not 9 characters long
MISTRAL = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or m.role == 'system' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS][{%- for c in m.tool_calls %}"
    "{%- if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}{{ (c.function | tojson)[:-1] }}, \"id\": \"{{ c.id }}\"}{{ ', ' if not loop.last else ']' }}"
    "{%- endfor %}"
    "{%- elif m.role == 'assistant' %}{{ m.content }}"
    "{%- elif m.role == 'tool' %}{%- if m.tool_call_id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "[TOOL_RESULTS]{\"content\": {{ m.content | tojson }}, \"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n{% else %}"
         "{% if (m.role == 'user') != (loop.index0 % 2 == (1 if messages[0].role == 'system' else 0)) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<end_of_turn>\n"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def args(c: tools.Call) -> dict:
    return json.loads(c.arguments)


# ---- parsers, one per family format -------------------------------------------------------------------------------
def test_hermes_and_smollm2_tags():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n' \
           '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = tools.parse("hermes", text, NAMES)
    assert content == "Let me look."
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "c"}),
                                                  ("add", {"a": 1, "b": 2})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    # SmolLM2: a JSON list in one tag; arguments given as a JSON string are read too
    text = '<tool_call>[{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}, ' \
           '{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    content, calls = tools.parse("smollm2", text, NAMES)
    assert content is None and [c.name for c in calls] == ["add", "get_weather"] and args(calls[0]) == {"a": 3, "b": 4}
    # an unclosed last tag (the reply ended at EOS) still counts; broken JSON or an unknown name is content
    assert tools.parse("hermes", '<tool_call>{"name": "add", "arguments": {}}', NAMES)[1][0].name == "add"
    for bad in ('<tool_call>{"name": "add", "arguments": {</tool_call>',
                '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "no call here"):
        assert tools.parse("hermes", bad, NAMES) == (bad, [])


def test_llama3_json():
    content, calls = tools.parse("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', NAMES)
    assert content is None and calls[0].name == "get_weather" and args(calls[0]) == {"city": "Rome"}
    _, calls = tools.parse("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                                          '{"name": "add", "parameters": {"a": 5, "b": 6}}', NAMES)
    assert [args(c) for c in calls] == [{"a": 1, "b": 2}, {"a": 5, "b": 6}]
    for text in ('The answer is {"name": "add"}', '{"name": "add", "parameters": {"a": 1}} and more words',
                 '{"key": "value"}', '{"name": "nope", "parameters": {}}'):
        assert tools.parse("llama3_json", text, NAMES) == (text, [])


def test_pythonic_gemma():
    content, calls = tools.parse("pythonic", '[get_weather(city="San Jose", unit="f"), add(a=1, b=-2)]', NAMES)
    assert content is None
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "San Jose", "unit": "f"}),
                                                  ("add", {"a": 1, "b": -2})]
    _, calls = tools.parse("pythonic", "```tool_code\nadd(a=[1, 2], b={'x': None})\n```", NAMES)
    assert args(calls[0]) == {"a": [1, 2], "b": {"x": None}}
    for text in ("[add(1, 2)]",  # positional arguments: not the format
                 "[add(a=__import__('os'))]",  # only literals are evaluated
                 "[print(a=1)]", "[1, 2, 3]", "Sure: [add(a=1, b=2)]", "just words"):
        assert tools.parse("pythonic", text, NAMES) == (text, [])


def test_forced_json_and_its_schema():
    content, calls = tools.parse("forced", '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', NAMES)
    assert content is None and calls[0].name == "add"
    named = tools.forced_schema([WEATHER, ADD], "add", True)
    assert named["properties"]["name"] == {"const": "add"} and named["properties"]["arguments"] == \
        ADD["function"]["parameters"]
    req = tools.forced_schema([WEATHER, ADD], None, False)
    assert req["type"] == "array" and req["minItems"] == 1 and req["maxItems"] == 1 and len(req["items"]["anyOf"]) == 2
    assert "maxItems" not in tools.forced_schema([WEATHER], None, True)


def test_mistral():
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "abcdefghi"}, ' \
           '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]'
    content, calls = tools.parse("mistral", text, NAMES)
    assert content is None and [(c.name, args(c)) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "c"})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    # the marker dropped by a tokenizer that skips special tokens: a reply that is wholly a list of calls
    assert [c.name for c in tools.parse("mistral", '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', NAMES)[1]] \
        == ["add"]
    # Mistral Small 3.2 / Devstral: name[CALL_ID]id[ARGS]{...} per call, after some content
    content, calls = tools.parse("mistral", 'Sure.[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Oslo", '
                                            '"unit": "c"}[TOOL_CALLS]add[ARGS]{"a": 3, "b": 4}', NAMES)
    assert content == "Sure." and [(c.name, args(c)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("add", {"a": 3, "b": 4})]
    for text in ['[TOOL_CALLS][{"name": "rm", "arguments": {}}]', "[TOOL_CALLS]add[ARGS]{oops",
                 "[1, 2, 3] are numbers", '[TOOL_CALLS]add[ARGS]{"a": 1} and more']:
        assert tools.parse("mistral", text, NAMES) == (text, [])
    assert tools.detect_format(MISTRAL) == "mistral"
    assert tools.write_calls("mistral", [{"name": "add", "arguments": {"a": 1}}]) == \
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]'


def test_detect_format_from_templates():
    assert tools.detect_format(HERMES) == "hermes"
    assert tools.detect_format(CHATML) == "smollm2"
    assert tools.detect_format(GEMMA) == "pythonic"
    assert tools.detect_format("<|start_header_id|>{{ m.content }}<|eot_id|>") == "llama3_json"
    assert tools.template_renders_tools(HERMES) and not tools.template_renders_tools(CHATML)


# ---- rendering ---------------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
]


def request_of(messages, **kw) -> ChatRequest:
    return ChatRequest.model_validate({"messages": messages, "tools": [WEATHER, ADD], **kw})


def test_native_template_renders_like_transformers(tmp_path):
    """A template that takes tools gets them, and the tool calls and results, exactly as transformers gives them."""
    transformers = pytest.importorskip("transformers")
    from test_serve import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = HERMES
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    body = request_of(CONVERSATION)
    messages, native = tools.prompt_messages(body.messages, HERMES, body.tool_list())
    assert native
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tools=body.tool_list())
    hf_messages = [dict(m) for m in CONVERSATION]
    hf_messages[2] = {**hf_messages[2], "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]}
    want = hf.apply_chat_template(hf_messages, tools=[WEATHER, ADD], add_generation_prompt=True, tokenize=False)
    assert ours == want
    assert '"name": "get_weather"' in ours and "<tool_response>\n-3 C, snow" in ours


def test_fallback_rendering_without_template_tools():
    """A template without tools: they go into the system message in the family's format; earlier calls are
    written as the model would write them; results become user turns (Gemma's template insists on alternation)."""
    from lmforge.tokenizer.chat_template import render_chat_template

    body = request_of(CONVERSATION)
    messages, native = tools.prompt_messages(body.messages, GEMMA, body.tool_list())
    assert not native
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("be brief\n\n") and "[func_name1(" in messages[0]["content"]
    assert messages[2]["content"] == "[get_weather(city='Oslo', unit='c')]"
    assert messages[3]["content"] == "```tool_output\n-3 C, snow\n```"
    text = render_chat_template(GEMMA, {"messages": messages, "add_generation_prompt": True, "bos_token": "<bos>"},
                                "gemma")
    assert text.endswith("<start_of_turn>model\n")
    # a user turn right after the results joins them (Gemma's template refuses two user turns in a row)
    more = request_of([*CONVERSATION, {"role": "user", "content": "and Rome?"}])
    messages, _ = tools.prompt_messages(more.messages, GEMMA, more.tool_list())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3]["content"] == "```tool_output\n-3 C, snow\n```\n\nand Rome?"
    render_chat_template(GEMMA, {"messages": messages, "add_generation_prompt": True, "bos_token": ""}, "gemma")
    messages, _ = tools.prompt_messages(body.messages[1:], CHATML, body.tool_list())
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert messages[2]["content"] == \
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n-3 C, snow\n</tool_response>"}
    # tool_choice none: no tool list in the prompt, but the conversation still renders
    messages, _ = tools.prompt_messages(body.messages[1:], CHATML, request_of(CONVERSATION[1:],
                                                                               tool_choice="none").tool_list())
    assert messages[0]["role"] == "user"


# ---- through the server, with the official client ------------------------------------------------------------------
CORPUS = ['{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}', '<tool_call>', '</tool_call>',
          "<|im_start|>", "<|im_end|>", "system user assistant tool", "weather in Oslo Paris Rome", "snow rain sun",
          '[{"a": 1, "b": 2}]', "the answer is", "# Tools <tools> </tools> <tool_response> </tool_response>"]


@pytest.fixture(scope="module", params=["hermes", "chatml", "mistral"])
def served(request, tmp_path_factory, one_thread):
    """A tiny llama (long enough context for the tool list) with a native-tools (Hermes, Mistral) or a plain ChatML
    template."""
    pytest.importorskip("llguidance")
    transformers = pytest.importorskip("transformers")
    from conftest import perturbed
    from test_serve import start_server

    from lmforge.generator import Generator
    from lmforge.tokenizer import Tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(CORPUS) for _ in range(6)) for _ in range(400)]
    tok = Tokenizer.train_bpe(texts, vocab_size=600, min_frequency=1)
    tok.chat_template = {"hermes": HERMES, "chatml": CHATML, "mistral": MISTRAL}[request.param]
    d = tmp_path_factory.mktemp(f"tools-{request.param}")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
    perturbed(transformers.LlamaForCausalLM(cfg)).save_pretrained(d)
    tok.save(d)
    srv = start_server(Generator.load(d), settings={"max_tokens": 200, "max_concurrent": 4})
    yield srv
    srv.stop()


def round_trip(client, stream: bool, choice) -> None:
    """tools -> tool_calls -> role tool -> a final answer, with the official client."""
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    model = client.models.list().data[0].id
    kw = dict(model=model, tools=[WEATHER, ADD], tool_choice=choice, temperature=0, max_tokens=120)
    if stream:
        chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
        calls: dict[int, dict] = {}
        for ch in chunks:
            for d in ch.choices[0].delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": "", "pieces": 0})
                c["id"] = d.id or c["id"]
                c["name"] += d.function.name or "" if d.function else ""
                c["arguments"] += d.function.arguments or "" if d.function else ""
                c["pieces"] += bool(d.function and d.function.arguments)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        got = [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
        # the arguments arrive as they are generated, in several deltas, not in one piece at the end
        assert all(c["pieces"] >= 3 for c in calls.values()), [c["pieces"] for c in calls.values()]
        # and assemble to exactly the non-streamed reply's calls (the same greedy request; ids aside)
        whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.tool_calls
        assert [(n, a) for _, n, a in got] == [(c.function.name, c.function.arguments) for c in whole]
    else:
        r = client.chat.completions.create(messages=messages, **kw)
        assert r.choices[0].finish_reason == "tool_calls"
        got = [(c.id, c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert got
    for call_id, name, arguments in got:
        # OpenAI's form; Mistral's templates take 9 alphanumeric characters only (the next turn renders them)
        assert re.fullmatch(r"call_[0-9a-f]{24}|[0-9a-f]{9}", call_id) and name in NAMES
        a = json.loads(arguments)  # always parses, and follows the function's schema
        if name == "get_weather":
            assert set(a) == {"city", "unit"} and a["unit"] in ("c", "f") and len(a["city"]) <= 10
        else:
            assert set(a) == {"a", "b"} and all(0 <= v <= 99 for v in a.values())
    if isinstance(choice, dict):
        assert [g[1] for g in got] == [choice["function"]["name"]]
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in got]})
    messages += [{"role": "tool", "tool_call_id": i, "content": "-3 C, snow"} for i, _, _ in got]
    final = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, ADD], temperature=0,
                                           max_tokens=8)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length") and isinstance(final.choices[0].message.content, str)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_round_trip_with_the_openai_client(served, stream, choice):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    round_trip(client, stream, choice)


def test_parallel_false_gives_one_call_and_errors_name_the_parameter(served):
    body = {"messages": [{"role": "user", "content": "add"}], "tools": [ADD, WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False, "temperature": 0, "max_tokens": 120}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1
    for extra, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                         ({"tools": [ADD, ADD]}, "tools"),
                         ({"messages": [{"role": "tool", "content": None}]}, "messages.0.content"),
                         ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
                          "messages.0.tool_calls.0.function.arguments")]:
        r = httpx.post(served.url + "/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_gemma4_calls():
    text = 'Sure.<|tool_call>call:get_weather{city:<|"|>San Jose, CA<|"|>,unit:<|"|>f<|"|>}<tool_call|>' \
           "<|tool_call>call:add{a:1,b:[2,{x:true}]}<tool_call|>"
    content, calls = tools.parse("gemma4", text, NAMES)
    assert content == "Sure."
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "San Jose, CA", "unit": "f"}),
                                                  ("add", {"a": 1, "b": [2, {"x": True}]})]
    # a tokenizer that drops the special markers from the text: the bare form still reads
    assert args(tools.parse("gemma4", "call:add{a:3,b:4}", NAMES)[1][0]) == {"a": 3, "b": 4}
    assert tools.parse("gemma4", "<|tool_call>call:rm{a:1}<tool_call|>", NAMES)[1] == []


# ---- real templates (llama.cpp's copies; `make llamacpp-convert`) ---------------------------------------------------
REAL = {"Qwen-Qwen2.5-7B-Instruct": "hermes", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
        "meta-llama-Llama-3.2-3B-Instruct": "llama3_json", "meta-llama-Llama-3.1-8B-Instruct": "llama3_json",
        "google-gemma-4-31B-it": "gemma4", "google-gemma-2-2b-it": "pythonic"}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(REAL))
def test_real_templates_render_as_transformers_and_their_calls_parse(name):
    """The family format is read from the template; the prompt is transformers' text for the same conversation;
    and the call the template writes for an assistant turn (what the model learned to emit) parses back."""
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    from test_real_tokenizers import MISSING, MODELS

    if MODELS is None:
        pytest.skip(MISSING)
    from lmforge.tokenizer.chat_template import render_chat_template

    source = (MODELS / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    fmt = tools.detect_format(source)
    assert fmt == REAL[name]
    body = request_of(CONVERSATION[1:])
    messages, native = tools.prompt_messages(body.messages, source, body.tool_list())
    assert native == (fmt != "pythonic")
    ctx = {**SPECIALS, "tools": body.tool_list() if native else None}
    ours = render_chat_template(source, {**ctx, "messages": messages, "add_generation_prompt": True}, name)
    if native:
        hf_messages = [dict(m) for m in CONVERSATION[1:]]
        hf_messages[1] = {**hf_messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]}
        want = render(conversations=[hf_messages], chat_template=source, add_generation_prompt=True, **ctx)[0][0]
        assert ours == want
        # the assistant turn as the template writes it, between the prompt and the end of the conversation
        user = messages[:1]
        head = render_chat_template(source, {**ctx, "messages": user, "add_generation_prompt": True}, name)
        full = render_chat_template(source, {**ctx, "messages": messages[:2], "add_generation_prompt": False}, name)
        turn = full[len(os.path.commonprefix([head, full])):]  # Gemma 4's prompt adds an empty thought
        for end in ("<|im_end|>", "<|eot_id|>", "<turn|>", "<end_of_turn>", "<|eom_id|>"):
            turn = turn.split(end)[0]
    else:
        turn = messages[1]["content"]
    _, calls = tools.parse(fmt, turn, NAMES)
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "c"})], turn


def test_deeply_nested_replies_are_content_not_errors():
    for fmt, text in [("gemma4", "call:add{a:" + "{" * 5000), ("pythonic", "[add(a=" + "[" * 5000 + "])]"),
                      ("hermes", "<tool_call>" + "[" * 5000), ("llama3_json", '{"a":' + "[" * 5000),
                      ("forced", "[" * 5000)]:
        assert tools.parse(fmt, text, NAMES) == (text, [])
    with pytest.raises(Exception, match="not valid JSON"):
        tools.call_arguments("[" * 5000, "messages.0.tool_calls.0.function.arguments")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506"])
def test_real_mistral_templates(name):
    """Mistral's real templates (llama.cpp's copies): the format is read from them, the prompt is transformers'
    text for a conversation with a tool call (9-character ids, which they insist on), and the call the template
    writes for the assistant turn parses back."""
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    from test_real_tokenizers import MISSING, MODELS

    if MODELS is None or not (MODELS / "templates" / f"{name}.jinja").exists():
        pytest.skip(MISSING)
    from lmforge.tokenizer.chat_template import render_chat_template

    source = (MODELS / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    assert tools.detect_format(source) == "mistral"
    conversation = json.loads(json.dumps(CONVERSATION[1:]).replace('"call_1"', '"abcdefghi"'))
    body = request_of(conversation)
    messages, native = tools.prompt_messages(body.messages, source, body.tool_list())
    assert native
    ctx = {**SPECIALS, "tools": body.tool_list()}
    ours = render_chat_template(source, {**ctx, "messages": messages, "add_generation_prompt": True}, name)
    hf_messages = [dict(m) for m in conversation]
    hf_messages[1] = {**hf_messages[1], "tool_calls": [{"id": "abcdefghi", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]}
    assert ours == render(conversations=[hf_messages], chat_template=source, add_generation_prompt=True, **ctx)[0][0]
    full = render_chat_template(source, {**ctx, "messages": messages[:2], "add_generation_prompt": False}, name)
    turn = full[full.index("[/INST]") + len("[/INST]"):].split("</s>")[0]
    _, calls = tools.parse("mistral", turn, NAMES)
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "c"})], turn
