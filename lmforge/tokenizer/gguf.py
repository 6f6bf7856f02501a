"""A tokenizer from a GGUF file's vocabulary metadata (`tokenizer.ggml.*`), as the original tokenizer.json works.

The ids are the original model's tokenizer's (llama.cpp's test ids for each real vocabulary). They match
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` except where transformers' conversion drops what the GGUF
keys say: it ignores some `tokenizer.ggml.pre` splits, Phi-3's rstrip and Llama 2's legacy spaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from lmforge.errors import TokenizerError
from lmforge.tokenizer.backends import bos_eos_processor, byte_alphabet, one_line

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# End-of-turn tokens that llama.cpp also stops on when a GGUF vocabulary holds them as control tokens.
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                "<|end_of_text|>")

# Byte-level GGUF vocabularies: `tokenizer.ggml.pre` names the pre-tokenizer (llama.cpp's table). Each entry is the
# split regexes of the original tokenizer.json, applied in turn (HF `Split`, isolated), and whether a word that is a
# token is kept whole without merging (`ignore_merges`, tiktoken-style vocabularies: Llama 3, Mistral's Tekken).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM (7B/67B): cased letters, ASCII/fullwidth punctuation, trailing spaces, CJK and digit runs, in turn.
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e"
    "\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_LLM = ("[\r\n]", "\\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
                 "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$", _CJK, r"\p{N}+")
PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("gpt-2", "phi-2"), ((_GPT2,), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3_SPLIT,), True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ((_LLAMA3_SPLIT,), False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ((_QWEN2_SPLIT,), False)),
    "qwen35": ((_QWEN35_SPLIT,), False),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    ((r"\p{N}", _GPT2), False)),
    "deepseek-coder": ((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"), False),
    "deepseek-llm": (_DEEPSEEK_LLM, False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"), False),
    "tekken": ((_TEKKEN_SPLIT,), True),
}
# Pre-tokenizers whose tokenizer.json composes the text (NFC) first (Qwen2 / Qwen2.5 / Qwen3; not Qwen3.5, which
# keeps combining marks): GGUF has no field for the normalizer, and without it a decomposed accent ("e" + U+0301)
# gives other ids than the original tokenizer.
NFC_PRES = ("qwen2", "deepseek-r1-qwen")
# Gemma vocabularies in GGUF: spaces are spelled "▁" in the model, and merges follow the token order.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# Phi-3's tokenizer.json strips the whitespace after its added tokens (`rstrip`), except after these; GGUF has no
# field for it, so, as llama.cpp does, a model whose `general.name` says Phi-3 gets it back.
_PHI3_NAMES = ("phi-3", "phi3")
_PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def _gguf_value(reader, key: str) -> Any:
    field = reader.get_field(key) if hasattr(reader, "get_field") else reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.11: decode by hand (strings are uint8 parts; arrays list their element parts in `data`).
    import gguf

    def scalar(part, vtype):
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _merges_from_vocab(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary without merges (SentencePiece BPE), best first.

    Each token yields every split into two vocabulary tokens. They are ordered by the token's priority
    (higher first), then by the longer left and right piece, ties keeping vocabulary order: this is the
    order transformers derives for the same GGUF, so the BPE results are the same.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    best: dict[str, float] = {}
    for t, p in zip(tokens, priority):
        best[t] = p  # a repeated token keeps its first position but its last priority, like a dict update
    found: list[tuple[float, int, int, str, str]] = []
    for t, p in best.items():
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((-p, -len(a), -len(b), a, b) for a, b in splits)
    found.sort(key=lambda x: x[:3])  # stable: equal keys keep the order above
    return [(a, b) for _, _, _, a, b in found]


def load_gguf(path_or_reader) -> tuple[Backend, dict[str, Any]]:
    """The backend and the `Tokenizer(...)` keyword arguments for a GGUF file's tokenizer metadata
    (`tokenizer.ggml.model` "gpt2" or "llama"). Takes a path, a `GGUFFile` or a `gguf.GGUFReader`."""
    from lmforge.gguf_file import GGUFFile

    if isinstance(path_or_reader, (str, Path)):
        name = str(path_or_reader)
        if not Path(name).is_file():
            raise TokenizerError(f"{name}: file not found")
        try:
            reader = GGUFFile(name)  # lazy metadata: no object per token until the tokens are read
        except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
            raise TokenizerError(f"{name}: not a readable GGUF file ({one_line(e)})") from None
    else:
        reader = path_or_reader
        name = str(getattr(getattr(reader, "data", None), "filename", None) or "<gguf reader>")

    kind = _gguf_value(reader, "tokenizer.ggml.model")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{name}: GGUF has no tokenizer metadata (tokenizer.ggml.model / tokens)")
    arch = _gguf_value(reader, "general.architecture") or ""
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or []
    ids = {k: _gguf_value(reader, f"tokenizer.ggml.{k}_token_id")
           for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    add_bos = _gguf_value(reader, "tokenizer.ggml.add_bos_token")
    add_eos = bool(_gguf_value(reader, "tokenizer.ggml.add_eos_token"))

    if kind == "gpt2":
        backend, spelled = _gguf_byte_level(reader, tokens, name)
        control_ok = spelled
        add_bos = bool(add_bos)
    elif kind == "llama":
        backend = _gguf_sentencepiece(reader, tokens, arch, ids["unknown"], name)
        control_ok = None
        add_bos = True if add_bos is None else bool(add_bos)  # llama.cpp's default for SentencePiece
    else:
        raise TokenizerError(f"{name}: unsupported tokenizer.ggml.model {kind!r} "
                             "(supported: gpt2, llama)")

    # Control tokens are special (whole in text, skipped on decode); user-defined ones are whole but kept.
    vocab = backend.get_vocab()
    phi3 = any(n in str(_gguf_value(reader, "general.name") or "").lower() for n in _PHI3_NAMES)

    def rstrip(t: str) -> bool:
        return phi3 and t not in _PHI3_NO_RSTRIP

    control = [AddedToken(t, special=True, normalized=False, rstrip=rstrip(t)) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (control_ok is None or set(t) <= control_ok)]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False, rstrip=rstrip(t)) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)

    def tok(key: str) -> str | None:
        i = ids[key]
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = tok("bos"), tok("eos")
    backend.post_processor = bos_eos_processor(bos, ids["bos"], eos, ids["eos"], add_bos, add_eos)
    extra_eos = [ids[k] for k in ("eot", "eom") if ids[k] is not None]
    extra_eos += [i for i, (t, ty) in enumerate(zip(tokens, types))
                  if ty == _CONTROL and t in _END_OF_TURN]
    ctx = _gguf_value(reader, f"{arch}.context_length") if arch else None
    return backend, dict(bos_token=bos, eos_token=eos, unk_token=tok("unknown"), pad_token=tok("padding"),
                         chat_template=_gguf_value(reader, "tokenizer.chat_template"),
                         model_max_length=int(ctx) if ctx else None, add_bos=add_bos and bos is not None,
                         extra_eos_ids=extra_eos, token_type_ids=False, source=name)


def _gguf_byte_level(reader, tokens: list[str], name: str) -> tuple[Backend, set[str]]:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges and split regex."""
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    raw = _gguf_value(reader, "tokenizer.ggml.merges")
    if raw is None:
        raise TokenizerError(f"{name}: byte-level GGUF tokenizer without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in raw]
    pre = _gguf_value(reader, "tokenizer.ggml.pre") or "default"
    if pre != "default" and pre not in PRE_SPLITS:
        raise TokenizerError(f"{name}: GGUF key 'tokenizer.ggml.pre' = {pre!r} names a pre-tokenizer lmforge does not "
                             f"implement (supported: default, {', '.join(sorted(PRE_SPLITS))})")
    splits, ignore_merges = PRE_SPLITS.get(pre, ((), False))
    backend = Backend(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                          fuse_unk=False, ignore_merges=ignore_merges))
    if not splits:  # "default" (or none): GPT-2's own regex, inside the ByteLevel step
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in NFC_PRES:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _gguf_sentencepiece(reader, tokens: list[str], arch: str, unk_id: int | None, name: str) -> Backend:
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback; merges come from the vocab."""
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    if arch in _GEMMA_ARCHS:
        # Runs of spaces are stored as real spaces; the model spells them with "▁". Gemma's scores do
        # not follow its merge order, the token order does.
        tokens = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t for t in tokens]
        priority = [-float(i) for i in range(len(tokens))]
    else:
        scores = _gguf_value(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(f"{name}: SentencePiece GGUF tokenizer without tokenizer.ggml.scores")
        priority = [float(s) for s in scores]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(BPE(vocab=vocab, merges=_merges_from_vocab(tokens, priority), unk_token=unk,
                          fuse_unk=True, byte_fallback=True))
    if arch in _GEMMA_ARCHS:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
    else:
        prefix = _gguf_value(reader, "tokenizer.ggml.add_space_prefix")
        prefix = True if prefix is None else bool(prefix)
        # as transformers' Llama converter: a "▁" before the text, then every space spelled "▁" (so " " is "▁▁")
        steps_n = [normalizers.Prepend("\u2581")] if prefix else []
        backend.normalizer = normalizers.Sequence([*steps_n, normalizers.Replace(" ", "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend
