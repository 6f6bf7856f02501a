"""Real tokenizers and chat templates of the families lmforge loads, from the llama.cpp sources
(`make llamacpp-convert` puts them in .cache/llama.cpp/; the tests skip, with the reason, without them).

- llama.cpp ships each family's vocabulary as a vocab-only GGUF (models/ggml-vocab-NAME.gguf) with a set of test
  strings (.inp: whitespace runs, emoji, CJK, code, accents, numbers) and the ids transformers' tokenizer of the
  original model gives them (.out). lmforge's tokenizer read from the GGUF metadata must give those ids, and decode
  them back to the string.
- The same vocabularies on 200 varied strings (tests/tokenizer_strings.py): lmforge's ids against llama.cpp's own
  tokenizer (llama-cpp-python, vocab only), against transformers' tokenizer built from the same GGUF, and through
  tokenizer.json both ways (lmforge saves, transformers reads; transformers saves, lmforge reads). Where the
  references disagree, the original tokenizer.json's behaviour decides (docs/models.md, "Real tokenizers").
- llama.cpp also ships real chat templates (models/templates/*.jinja): lmforge's sandboxed renderer must give
  transformers' text for the same conversations, with tools where the template takes them.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from tokenizer_strings import tokenizer_strings

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.gguf import NFC_PRES, _gguf_value

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
    "deepseek-llm": "DeepSeek LLM 7B/67B (cased-letter and punctuation classes, digit runs)",
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


# ---- 200 varied strings --------------------------------------------------------------------------------------------
STRINGS = tokenizer_strings()
_NORMAL, _CONTROL, _BYTE = 1, 3, 6  # GGUF token types


def _gguf_facts(path: Path) -> tuple[str | None, list[str], list[int]]:
    from lmforge.gguf_file import GGUFFile

    reader = GGUFFile(str(path))
    return (_gguf_value(reader, "tokenizer.ggml.pre"), _gguf_value(reader, "tokenizer.ggml.tokens"),
            _gguf_value(reader, "tokenizer.ggml.token_type") or [])


def _llama_cpp_ids(path: Path) -> list[list[int] | None]:
    """llama.cpp's ids for STRINGS, special-token text parsed as transformers parses it; None where llama.cpp is
    not the original tokenizer's behaviour and no other llama.cpp call stands in for it.

    - A vocabulary whose tokenizer.json composes the text (NFC, `NFC_PRES`): llama.cpp does not normalize, so it
      gets the composed string.
    - llama.cpp promotes "control-looking" ordinary tokens to control ones on its own (Qwen's plain "</s>": it logs
      "its type will be overridden"); the original reads them as text. A string where llama.cpp emitted one is
      tokenized with special=False instead (the same as the original when no real control token is in it).
    """
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llamacpp)")
    pre, tokens, types = _gguf_facts(path)
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        promoted = {i for i, ty in enumerate(types)
                    if ty == _NORMAL and llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL}
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
        out: list[list[int] | None] = []
        for s in STRINGS:
            text = unicodedata.normalize("NFC", s) if pre in NFC_PRES else s
            ids = model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if promoted.intersection(ids):
                ids = None if any(t in text for t in control) else model.tokenize(
                    text.encode("utf-8"), add_bos=False, special=False)
            out.append(ids)
        return out
    finally:
        model.close()


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(VOCABS))
def test_200_strings_equal_llama_cpp(name):
    """lmforge's GGUF tokenizer gives llama.cpp's ids on 200 strings (code, emoji, scripts, whitespace runs, digits,
    URLs, contractions, special-token text), and plain text (no control or user-defined token in its ids, not
    changed by NFC) decodes back to itself."""
    if MODELS is None:
        pytest.skip(MISSING)
    path = MODELS / f"ggml-vocab-{name}.gguf"
    want = _llama_cpp_ids(path)
    assert len(STRINGS) == 200 and sum(w is None for w in want) <= 2
    tok = Tokenizer.from_gguf(path)
    got = [tok.encode(s, add_special_tokens=False) for s in STRINGS]
    wrong = [(s, g, w) for s, g, w in zip(STRINGS, got, want) if w is not None and g != w]
    assert not wrong, f"{len(wrong)} of 200 strings differ from llama.cpp, first: {wrong[0]}"
    _, _, types = _gguf_facts(path)
    plain = [(s, g) for s, g in zip(STRINGS, got)
             if unicodedata.normalize("NFC", s) == s and all(types[i] in (_NORMAL, _BYTE) for i in g)]
    undecoded = [s for s, g in plain if tok.decode(g, skip_special_tokens=False) != s]
    assert len(plain) >= 100 and not undecoded, f"{len(undecoded)} strings do not decode back: {undecoded[0]!r}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(VOCABS))
def test_200_strings_through_tokenizer_json_equal_transformers(name, tmp_path):
    """The tokenizer.json lmforge writes for a GGUF vocabulary, read by transformers' AutoTokenizer, gives lmforge's
    ids with and without special tokens, and the same decoded text (special tokens kept and skipped)."""
    auto = pytest.importorskip("transformers").AutoTokenizer
    if MODELS is None:
        pytest.skip(MISSING)
    tok = Tokenizer.from_gguf(MODELS / f"ggml-vocab-{name}.gguf")
    hf = auto.from_pretrained(tok.save(tmp_path))
    for add in (False, True):
        wrong = [s for s in STRINGS if tok.encode(s, add_special_tokens=add) != hf(s, add_special_tokens=add).input_ids]
        assert not wrong, f"add_special_tokens={add}: {len(wrong)} of 200 differ, first: {wrong[0]!r}"
    for s in STRINGS:
        ids = tok.encode(s)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (s, skip)


# transformers' GGUF conversion loses what the GGUF keys do not spell out. Where it and llama.cpp disagree, the
# original tokenizer.json (llama.cpp's .out ids, made with it) decides, and lmforge follows it.
_HF_GGUF_LOSSES = {
    "llama-bpe": "adds an <|endoftext|> token the vocabulary does not have (id 128256)",
    "llama-spm": "builds a non-legacy Metaspace (' ' -> '▁', no '▁' after special tokens); the original prepends",
    "starcoder": "ignores tokenizer.ggml.pre (whitespace runs, digits)",
    "deepseek-coder": "ignores tokenizer.ggml.pre",
    "deepseek-llm": "ignores tokenizer.ggml.pre; adds an <|endoftext|> token (id 102400)",
    "falcon": "ignores tokenizer.ggml.pre (digit triples, punctuation runs)",
    "phi-3": "drops the rstrip of Phi-3's added tokens (llama.cpp restores it from general.name)",
}


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("name", list(VOCABS))
def test_200_strings_against_transformers_gguf_conversion(name, tmp_path):
    """transformers' own tokenizer from the same GGUF (slow: its conversion takes 5-45 s): where lmforge's ids differ
    from it, they are llama.cpp's (both references never disagree with lmforge at once), and where llama.cpp departs
    from the original on its own (promoted "control-looking" tokens) lmforge equals transformers. Then the
    tokenizer.json transformers saves, read by lmforge, gives transformers' ids with and without special tokens, and
    its decoded text."""
    transformers = pytest.importorskip("transformers")
    if MODELS is None:
        pytest.skip(MISSING)
    path = MODELS / f"ggml-vocab-{name}.gguf"
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(MODELS), gguf_file=path.name)
    except ValueError as e:  # "GGUF model with architecture refact is not supported yet."
        pytest.skip(f"transformers cannot read this GGUF: {e}")
    want = _llama_cpp_ids(path)
    tok = Tokenizer.from_gguf(path)
    differ = 0
    for s, w in zip(STRINGS, want):
        ids, ref = tok.encode(s, add_special_tokens=False), hf(s, add_special_tokens=False).input_ids
        if w is None:  # llama.cpp promoted a token the original reads as text
            assert ids == ref, s
        elif ids != ref:
            differ += 1
            assert ids == w, f"differs from transformers and from llama.cpp: {s!r}"
    assert differ == 0 or name in _HF_GGUF_LOSSES or _gguf_facts(path)[0] in NFC_PRES, differ

    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    ref_json = _json_reader(transformers, tmp_path)
    for add in (False, True):
        wrong = [s for s in STRINGS
                 if ours.encode(s, add_special_tokens=add) != ref_json(s, add_special_tokens=add).input_ids]
        assert not wrong, f"tokenizer.json, add_special_tokens={add}: {len(wrong)} differ, first: {wrong[0]!r}"
    for s in STRINGS:
        ids = ref_json(s).input_ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref_json.decode(ids, skip_special_tokens=skip), s


def _json_reader(transformers, d: Path):
    """transformers' tokenizer for a saved directory. Its Qwen2Tokenizer class rebuilds the pipeline from its own
    defaults (NFC and Qwen2's regex, whatever the file says); the generic `TokenizersBackend` reads the file as
    written, which is what lmforge's from_dir is meant to equal."""
    import json

    hf = transformers.AutoTokenizer.from_pretrained(d)
    file = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    built = json.loads(hf.backend_tokenizer.to_str())
    if (built["normalizer"], built["pre_tokenizer"]) != (file["normalizer"], file["pre_tokenizer"]):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        hf = TokenizersBackend.from_pretrained(d)
    return hf


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
