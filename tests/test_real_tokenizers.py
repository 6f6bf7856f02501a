"""Real tokenizers and chat templates of the families lmforge loads, from the llama.cpp sources
(`make llamacpp-convert` puts them in .cache/llama.cpp/; the tests skip, with the reason, without them).

- llama.cpp ships each family's vocabulary as a vocab-only GGUF (models/ggml-vocab-NAME.gguf) with a set of test
  strings (.inp: whitespace runs, emoji, CJK, code, accents, numbers) and the ids transformers' tokenizer of the
  original model gives them (.out). lmforge's tokenizer read from the GGUF metadata must give those ids, and decode
  them back to the string.
- llama.cpp also ships real chat templates (models/templates/*.jinja): lmforge's sandboxed renderer must give
  transformers' text for the same conversations, with tools where the template takes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
_FOUND = sorted((ROOT / ".cache" / "llama.cpp").glob("*/vendor/llama.cpp/models"))
MODELS = _FOUND[-1] if _FOUND else None
MISSING = "llama.cpp's test vocabularies not found (run `make llamacpp-convert`)"

# vocab file -> the families (and tokenizer kind) it stands for
VOCABS = {
    "llama-bpe": "Llama 3.x (tiktoken-style byte-level BPE, whole-word tokens kept)",
    "qwen2": "Qwen2 / Qwen2.5 / Qwen3 (byte-level BPE, single digits)",
    "qwen35": "Qwen3.5 (byte-level BPE, combining marks kept with letters)",
    "phi-3": "Phi-3 (SentencePiece BPE, byte fallback)",
    "llama-spm": "Llama 2 / Mistral 7B (SentencePiece BPE, byte fallback)",
    "gpt-2": "GPT-2",
    "starcoder": "StarCoder / SmolLM split (digits one by one)",
    "refact": "Refact",
    "command-r": "Command-R",
    "deepseek-coder": "DeepSeek-Coder (several split steps)",
    "falcon": "Falcon (punctuation runs, digit triples)",
}


def _cases(name: str) -> list[tuple[str, list[int]]]:
    inp = (MODELS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (MODELS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    inp[-1] = inp[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    assert len(inp) <= len(out)
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inp, out)]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(VOCABS))
def test_real_vocabulary_ids_equal_the_original_tokenizer(name):
    if MODELS is None:
        pytest.skip(MISSING)
    tok = Tokenizer.from_gguf(MODELS / f"ggml-vocab-{name}.gguf")
    cases = _cases(name)
    assert len(cases) >= 40
    wrong = [(s, tok.encode(s, add_special_tokens=False), want) for s, want in cases
             if tok.encode(s, add_special_tokens=False) != want]
    assert not wrong, f"{len(wrong)} of {len(cases)} strings differ, first: {wrong[0]}"
    undecoded = [s for s, want in cases if tok.decode(want, skip_special_tokens=False) != s]
    assert not undecoded, f"{len(undecoded)} strings do not decode back, first: {undecoded[0]!r}"


@pytest.mark.llamacpp
def test_a_pre_tokenizer_lmforge_does_not_implement_is_refused():
    """GPT-NeoX's split (llama.cpp's "mpt") is not one lmforge implements: refused with its name, never read as
    GPT-2's (which gives other ids for runs of spaces)."""
    if MODELS is None:
        pytest.skip(MISSING)
    with pytest.raises(TokenizerError, match="'tokenizer.ggml.pre' = 'mpt'"):
        Tokenizer.from_gguf(MODELS / "ggml-vocab-mpt.gguf")


# ---- chat templates ----------------------------------------------------------------------------------------------
TEMPLATES = {  # template file -> its special tokens
    "Qwen-Qwen2.5-7B-Instruct": {},
    "Qwen-Qwen3-0.6B": {},
    "meta-llama-Llama-3.1-8B-Instruct": {"bos_token": "<|begin_of_text|>"},
    "meta-llama-Llama-3.2-3B-Instruct": {"bos_token": "<|begin_of_text|>"},
    "microsoft-Phi-3.5-mini-instruct": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "mistralai-Mistral-Nemo-Instruct-2407": {"bos_token": "<s>", "eos_token": "</s>"},
    "google-gemma-2-2b-it": {"bos_token": "<bos>"},
    "HuggingFaceTB-SmolLM3-3B": {},
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": {"bos_token": "<|begin_of_text|>"},
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! ünï 中文 😀"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a \"joke\"\n  indented"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
TOOL_ROUND = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 18}"},
]


def _template(name: str) -> str:
    if MODELS is None:
        pytest.skip(MISSING)
    return (MODELS / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_chat_templates_render_as_transformers(name):
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    source = _template(name)
    tok = Tokenizer.from_gguf(MODELS / "ggml-vocab-gpt-2.gguf")  # the text depends on the template alone
    specials = {**tok.special_tokens, **TEMPLATES[name]}  # the same special-token strings for both renderers
    convs = [*CONVERSATIONS] + ([TOOL_ROUND] if "tool" in source else [])
    rendered, refused = 0, []
    for conv in convs:
        for gen in (True, False):
            for tools in ([None, TOOLS] if "tools" in source else [None]):
                kw = dict(add_generation_prompt=gen, tools=tools, chat_template=source, **specials)
                try:
                    want = render(conversations=[conv], **kw)[0][0]
                except Exception as e:  # the template refuses (raise_exception) or fails: ours says so in a line
                    with pytest.raises(TokenizerError):
                        tok.apply_chat_template(conv, **kw)
                    refused.append(f"{type(e).__name__}: {e}")
                    continue
                assert tok.apply_chat_template(conv, **kw) == want, (conv, gen, tools)
                rendered += 1
    assert rendered >= 2, refused


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "phi-3", "starcoder", "deepseek-coder"])
def test_a_real_vocabulary_survives_gguf_export(name, tmp_path):
    """A model exported with a tokenizer read from GGUF carries the same tokenizer (pre-tokenizer name, whole-word
    flag, SentencePiece spaces): the file read back gives the original tokenizer's ids."""
    if MODELS is None:
        pytest.skip(MISSING)
    from lmforge.checkpoints import load_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.tasks.export import export

    tok = Tokenizer.from_gguf(MODELS / f"ggml-vocab-{name}.gguf")
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      context_length=64)
    back = load_checkpoint(export(Transformer(cfg), tmp_path / "m.gguf", type="f16", tokenizer=tok)).tokenizer
    wrong = [s for s, want in _cases(name) if back.encode(s, add_special_tokens=False) != want]
    assert not wrong, f"{len(wrong)} strings differ after export, first: {wrong[0]!r}"
