"""`tokenizers` backends built from Hugging Face / GPT-2 / BERT files, and the pieces every builder shares.

Sources: tokenizer.json, vocab.json + merges.txt (GPT-2 byte-level BPE), vocab.txt (BERT WordPiece), and the
chat template of a Hugging Face directory. Errors are `TokenizerError`s that name the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from lmforge.errors import TokenizerError

ENDOFTEXT = "<|endoftext|>"


def one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def read_json(path: Path, what: str = "JSON") -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: invalid {what} ({one_line(e)})") from None


def read_json_opt(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def bos_eos_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
                      add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """Post-processor adding BOS/EOS around each sequence (as transformers builds from add_bos/eos_token)."""
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    pre = f"{bos}:0 " if add_bos else ""
    post = f" {eos}:0" if add_eos else ""
    single = f"{pre}$A:0{post}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    specials = [(bos, bos_id)] if add_bos else []
    if add_eos and not (add_bos and eos == bos):
        specials.append((eos, eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def load_backend(path: Path) -> Backend:
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found")
    read_json(path)  # a clear message for broken JSON before the Rust parser's
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception
        raise TokenizerError(f"{path}: not a tokenizers tokenizer.json ({one_line(e)})") from None


def byte_level_backend(vocab_json: Path, merges_txt: Path) -> Backend:
    vocab = read_json(vocab_json)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{vocab_json}: expected a JSON object of token -> id")
    if not merges_txt.is_file():
        raise TokenizerError(f"{merges_txt}: file not found")
    merges = []
    for n, line in enumerate(merges_txt.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines(): U+2028..
        line = line.rstrip("\r")
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges_txt}: line {n} is not two space-separated tokens")
        merges.append((parts[0], parts[1]))
    try:
        model = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                    fuse_unk=False)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception
        raise TokenizerError(f"{merges_txt}: merges do not fit {vocab_json.name} ({one_line(e)})") from None
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = bos_eos_processor(None, None, None, None, False, False)
    return backend


def wordpiece_backend(vocab_txt: Path, cfg: dict) -> Backend:
    """BERT's tokenizer from vocab.txt, with the normalizer options tokenizer_config.json gives."""
    vocab: dict[str, int] = {}
    lines = vocab_txt.read_text(encoding="utf-8").split("\n")  # one token per line; not splitlines(): U+2028..
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        vocab.setdefault(line.rstrip("\r"), i)
    unk = token_text(cfg.get("unk_token")) or "[UNK]"
    cls_tok, sep = token_text(cfg.get("cls_token")) or "[CLS]", token_text(cfg.get("sep_token")) or "[SEP]"
    for t in (unk, cls_tok, sep):
        if t not in vocab:
            raise TokenizerError(f"{vocab_txt}: special token {t!r} is not in the vocabulary")
    backend = Backend(WordPiece(vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True) is not False,
        strip_accents=cfg.get("strip_accents"), lowercase=cfg.get("do_lower_case", True) is not False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls_tok}:0 $A:0 {sep}:0", pair=f"{cls_tok}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls_tok, vocab[cls_tok]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def chat_template_of(d: Path, cfg: dict) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if isinstance(tpl, str) and tpl:
        return tpl
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        tpl = read_json(d / "chat_template.json").get("chat_template")
        return tpl if isinstance(tpl, str) else None
    return None

