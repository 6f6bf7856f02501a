"""A thin wrapper over `tokenizers.Tokenizer`: the Rust library tokenizes, we load, batch and template.

Sources: a `tokenizer.json`, a Hugging Face directory (tokenizer.json, or vocab.json + merges.txt, or a
BERT vocab.txt, plus tokenizer_config.json / special_tokens_map.json / generation_config.json), GPT-2 style
vocab/merges files, or the tokenizer metadata of a GGUF file. The GGUF conversion follows what transformers
does for the same file, so ids match `AutoTokenizer.from_pretrained(dir, gguf_file=name)`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, WordPiece
from tokenizers.trainers import BpeTrainer

from lmforge.errors import TokenizerError
from lmforge.io import atomic_write

__all__ = ["Tokenizer"]

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
ENDOFTEXT = "<|endoftext|>"
# transformers writes this "no limit" sentinel (int(1e30)) as model_max_length; we read it as None.
_NO_LIMIT = 10**12

_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# End-of-turn tokens that llama.cpp also stops on when a GGUF vocabulary holds them as control tokens.
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                "<|end_of_text|>")

# Split regexes for byte-level GGUF vocabularies whose `tokenizer.ggml.pre` differs from GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Gemma vocabularies in GGUF: spaces are spelled "▁" in the model, and merges follow the token order.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _read_json(path: Path, what: str = "JSON") -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: invalid {what} ({_one_line(e)})") from None


def _read_json_opt(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None,
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


def _clean_up_spaces(text: str) -> str:
    """Undo the spaces a word-level decoder puts before punctuation and English contractions."""
    for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, tight)
    return text


# ------------------------------------------------------------------------------------------ chat templates

def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False):
    """Jinja's own tojson escapes HTML characters; chat templates expect plain JSON."""
    from markupsafe import Markup

    return Markup(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                             sort_keys=sort_keys))


def _template_cause(e: Exception) -> str:
    """One line: the template's own message (raise_exception, syntax, sandbox) or the Python error it hit."""
    import jinja2

    line = getattr(e, "lineno", None)
    where = f" (line {line})" if isinstance(e, jinja2.TemplateSyntaxError) and line else ""
    if isinstance(e, jinja2.exceptions.SecurityError):
        return f"refused by the sandbox: {_one_line(e)}{where}"
    if isinstance(e, jinja2.exceptions.TemplateError):
        return f"{_one_line(e)}{where}"
    return f"{type(e).__name__}: {_one_line(e)[:200]}"


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


_MAX_TEMPLATE_ITEMS = 1_000_000  # longest string / list a template may build with `*`
_MAX_POWER_BITS = 4096  # largest integer a template may build with `**`


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Chat templates come from model files, so they run in jinja2's immutable sandbox, which also refuses
    the two cheap memory bombs it lets through (`'x' * 10**9`, `9 ** 10**9`); ranges it caps itself."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator: str, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_TEMPLATE_ITEMS:
                    raise SecurityError(f"a repeated sequence longer than {_MAX_TEMPLATE_ITEMS:,} items is refused")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise SecurityError(f"a power above 2**{_MAX_POWER_BITS} is refused")
            return super().call_binop(context, operator, left, right)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for loss masks; render as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ------------------------------------------------------------------------------------------ GGUF helpers

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


# ------------------------------------------------------------------------------------------ the tokenizer

class Tokenizer:
    """Encode/decode/batch/chat-template on top of a `tokenizers.Tokenizer` and the model's special tokens.

    `pad_id` falls back to `eos_id` when the model has no pad token (GPT-2): the embeddings need no new row,
    and batches stay correct because `attention_mask` marks the padding.
    """

    def __init__(self, backend: Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 extra_special: dict[str, str] | None = None, chat_template: str | None = None,
                 padding_side: str = "right", model_max_length: int | None = None,
                 add_bos: bool | None = None, extra_eos_ids: Iterable[int] = (),
                 clean_up_tokenization_spaces: bool = False, token_type_ids: bool | None = None,
                 source: str = "tokenizer") -> None:
        self._tk = backend
        self._tk.no_truncation()
        self._tk.no_padding()
        self._lock = threading.RLock()
        self.source = source
        tokens = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                  "pad_token": pad_token, **(extra_special or {})}
        # Special tokens are matched whole in raw text and skipped on decode; only known tokens qualify.
        self.special_tokens: dict[str, str] = {k: v for k, v in tokens.items()
                                               if v is not None and backend.token_to_id(v) is not None}
        new = [AddedToken(t, special=True, normalized=False)
               for t in dict.fromkeys(self.special_tokens.values()) if not self._is_special_added(t)]
        if new:
            backend.add_special_tokens(new)
        self.chat_template = chat_template
        self.padding_side = padding_side
        limited = model_max_length is not None and 0 < model_max_length < _NO_LIMIT
        self.model_max_length = model_max_length if limited else None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        eos = self.eos_id
        self.eos_ids: list[int] = list(dict.fromkeys(([eos] if eos is not None else [])
                                                     + list(extra_eos_ids)))
        if add_bos is None:  # ask the post-processor
            bos = self.bos_id
            with_specials = backend.encode("a").ids
            add_bos = bos is not None and bool(with_specials) and with_specials[0] == bos \
                and backend.encode("a", add_special_tokens=False).ids[:1] != [bos]
        self._add_bos = bool(add_bos)
        if token_type_ids is None:  # BERT-family models read segment ids
            token_type_ids = type(backend.model).__name__ == "WordPiece"
        self.returns_token_type_ids = token_type_ids

    def _is_special_added(self, token: str) -> bool:
        tid = self._tk.token_to_id(token)
        added = self._tk.get_added_tokens_decoder().get(tid)
        return added is not None and added.content == token and added.special

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, add_bos={self.add_bos})")

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ attributes
    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (do not enable padding/truncation on it)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return None if tok is None else self._tk.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def pad_token(self) -> str | None:
        """The pad token, or the EOS token when the model has none (see the class docstring)."""
        return self.special_tokens.get("pad_token") or self.eos_token

    @property
    def pad_id(self) -> int | None:
        pid = self._special_id("pad_token")
        return self.eos_id if pid is None else pid

    @property
    def has_pad_token(self) -> bool:
        """Whether the model defines its own pad token (False when `pad_id` is the EOS fallback)."""
        return "pad_token" in self.special_tokens

    @property
    def add_bos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS for this model family."""
        return self._add_bos

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side: expected 'left' or 'right', got {side!r}")
        self._padding_side = side

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI logprobs' `bytes`): a token may hold part of a UTF-8 character,
        which decode() would turn into U+FFFD. Byte-level BPE pieces map back through GPT-2's byte table,
        SentencePiece byte-fallback pieces (<0xE2>) to their byte; anything else is its decoded text."""
        text = self.decode([token_id], skip_special_tokens=False)
        piece = self.id_to_token(token_id) or ""
        if "\ufffd" in text:
            inverse = {c: b for b, c in _byte_alphabet().items()}
            if piece and all(c in inverse for c in piece):
                return bytes(inverse[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
        return text.encode("utf-8")

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected a str, got {type(text).__name__}")
        with self._lock:  # encode_batch may have truncation switched on for a moment
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: str | Sequence[str], *, pairs: Sequence[str] | None = None,
                     add_special_tokens: bool = True, max_length: int | None = None, truncation: bool = True,
                     padding: bool | str = True, padding_side: str | None = None,
                     return_tensors: str | None = "pt", return_offsets: bool = False) -> dict[str, Any]:
        """Tokenize a batch into `input_ids` / `attention_mask` (+ `token_type_ids`, `offsets`).

        Truncation (longest-first for pairs, special tokens included) cuts to `max_length`, or to
        `model_max_length` when that is None. `padding=True` pads to the longest row, "max_length" to
        `max_length`; padding uses `pad_id` on `padding_side` (default: the tokenizer's). With
        `return_tensors="pt"` values are torch.long tensors of shape (B, T) ((B, T, 2) for offsets, which are
        character spans in each row's own text, (0, 0) for special and pad tokens); with None, lists.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise TokenizerError(f"encode_batch: {len(texts)} texts but {len(pairs)} pairs")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side: expected 'left' or 'right', got {side!r}")
        limit = max_length if max_length is not None else self.model_max_length
        inputs = list(zip(texts, pairs)) if pairs is not None else texts
        with self._lock:  # truncation is backend state: keep concurrent callers apart
            try:
                if truncation and limit is not None:
                    self._tk.enable_truncation(int(limit), strategy="longest_first")
                encs = self._tk.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception (e.g. max_length too small)
                raise TokenizerError(f"encode_batch: {_one_line(e)}") from None
            finally:
                self._tk.no_truncation()
        want_types = self.returns_token_type_ids or pairs is not None
        rows = {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs]}
        if want_types:
            rows["token_type_ids"] = [e.type_ids for e in encs]
        if return_offsets:
            rows["offsets"] = [[list(o) for o in e.offsets] for e in encs]
        lengths = [len(r) for r in rows["input_ids"]]
        if padding == "max_length":
            if max_length is None:
                raise TokenizerError("encode_batch: padding='max_length' needs max_length")
            width = max([max_length, *lengths])
        elif padding:
            width = max(lengths, default=0)
        else:
            width = None
        if width is not None:
            pad_id = self.pad_id
            if pad_id is None and any(n < width for n in lengths):
                raise TokenizerError(f"{self.source}: no pad or eos token to pad a batch with")
            fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "offsets": [0, 0]}
            for key, values in rows.items():
                for i, row in enumerate(values):
                    extra = [fill[key]] * (width - len(row))
                    values[i] = extra + row if side == "left" else row + extra
        if return_tensors == "pt":
            if width is None and len(set(lengths)) > 1:
                raise TokenizerError("encode_batch: rows differ in length; pass padding=True for tensors")
            n = width if width is not None else (lengths[0] if lengths else 0)
            out = {}
            for k, v in rows.items():
                shape = (len(v), n, 2) if k == "offsets" else (len(v), n)
                out[k] = torch.tensor(v, dtype=torch.long).reshape(shape)
            return out
        if return_tensors is not None:
            raise TokenizerError(f"encode_batch: return_tensors must be 'pt' or None, got {return_tensors!r}")
        return rows

    def __call__(self, texts: str | Sequence[str], **kwargs) -> dict[str, Any]:
        return self.encode_batch(texts, **kwargs)

    @staticmethod
    def _as_list(ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            return ids.reshape(-1).tolist()
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        text = self._tk.decode(self._as_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def decode_batch(self, batch: Sequence[Sequence[int]] | torch.Tensor,
                     skip_special_tokens: bool = True) -> list[str]:
        rows = batch.tolist() if isinstance(batch, torch.Tensor) else [self._as_list(r) for r in batch]
        texts = self._tk.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [_clean_up_spaces(t) for t in texts] if self.clean_up_tokenization_spaces else texts

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, tools: list | None = None,
                            documents: list | None = None, chat_template: str | None = None,
                            **kwargs) -> str | list[int]:
        """Render `messages` with the model's chat template (as transformers does); ids when `tokenize`.

        The rendered text already holds any BOS the template writes, so tokenizing adds no special tokens.
        """
        source = chat_template or self.chat_template
        if not source:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat_template")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("apply_chat_template: messages must be a list of {'role', 'content'} dicts")
        context = {**self.special_tokens, **kwargs, "messages": list(messages), "tools": tools,
                   "documents": documents, "add_generation_prompt": add_generation_prompt}
        which = "the chat_template argument" if chat_template else f"{self.source}: chat_template"
        try:
            text = _compile_template(source).render(**context)
        except Exception as e:  # the template is data from a model file: whatever it raises is its fault
            raise TokenizerError(f"{which} failed to render: {_template_cause(e)}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------ save
    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by transformers).

        The post-processor in tokenizer.json is the one source of whether BOS/CLS/SEP are added, so
        add_bos_token is not written (transformers would rebuild the post-processor from it).
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "tokenizer.json", lambda f: self._tk.save(str(f)))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                                  "padding_side": self.padding_side,
                                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                                  "model_input_names": ["input_ids"]
                                  + (["token_type_ids"] if self.returns_token_type_ids else [])
                                  + ["attention_mask"]}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write(d / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        specials = json.dumps(self.special_tokens, indent=2, ensure_ascii=False)
        atomic_write(d / "special_tokens_map.json", specials + "\n")
        return d

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, source: str | Path) -> Tokenizer:
        """A directory, a tokenizer.json or a GGUF file."""
        p = Path(source)
        if p.is_dir():
            return cls.from_dir(p)
        if p.is_file():
            with p.open("rb") as f:
                magic = f.read(4)
            return cls.from_gguf(p) if p.suffix == ".gguf" or magic == b"GGUF" else cls.from_file(p)
        raise TokenizerError(f"{p}: no such file or directory")

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> Tokenizer:
        """A `tokenizers` tokenizer.json; special tokens come from kwargs (see `from_dir` for configs)."""
        p = Path(path)
        backend = _load_backend(p)
        if "pad_token" not in kwargs and backend.padding:
            kwargs["pad_token"] = backend.padding.get("pad_token")
        kwargs.setdefault("source", str(p))
        return cls(backend, **kwargs)

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> Tokenizer:
        """GPT-2 style byte-level BPE; `<|endoftext|>` is BOS, EOS and UNK when the vocabulary has it."""
        backend = _byte_level_backend(Path(vocab_json), Path(merges_txt))
        if backend.token_to_id(ENDOFTEXT) is not None:
            for key in ("bos_token", "eos_token", "unk_token"):
                kwargs.setdefault(key, ENDOFTEXT)
        kwargs.setdefault("source", str(vocab_json))
        return cls(backend, **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face directory: tokenizer.json (or vocab.json + merges.txt, or vocab.txt) + configs."""
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"{d}: not a directory" if d.exists() else f"{d}: directory not found")
        cfg = _read_json_opt(d / "tokenizer_config.json")
        specials_map = _read_json_opt(d / "special_tokens_map.json")
        gen = _read_json_opt(d / "generation_config.json")
        if (d / "tokenizer.json").is_file():
            backend = _load_backend(d / "tokenizer.json")
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            backend = _byte_level_backend(d / "vocab.json", d / "merges.txt")
        elif (d / "vocab.txt").is_file():
            backend = _wordpiece_backend(d / "vocab.txt", cfg)
        else:
            raise TokenizerError(f"{d}: no tokenizer files "
                                 "(tokenizer.json, vocab.json + merges.txt or vocab.txt)")

        tokens = {k: _token_text(cfg.get(k)) or _token_text(specials_map.get(k)) for k in SPECIAL_KEYS}
        if type(backend.model).__name__ == "WordPiece":  # BERT's defaults, as transformers' BertTokenizer has
            for key, default in _BERT_SPECIALS.items():
                tokens[key] = tokens[key] or (default if backend.token_to_id(default) is not None else None)
        if backend.padding and not tokens["pad_token"]:
            tokens["pad_token"] = backend.padding.get("pad_token")
        gpt2_like = type(backend.model).__name__ == "BPE" and backend.token_to_id(ENDOFTEXT) is not None
        if gpt2_like and not tokens["bos_token"] and not tokens["eos_token"] and "cls_token" not in cfg:
            # GPT-2 style directories name no special tokens; transformers' GPT-2 defaults apply.
            tokens.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                          unk_token=tokens["unk_token"] or ENDOFTEXT)
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            bos, eos = tokens["bos_token"], tokens["eos_token"]
            backend.post_processor = _template(bos, backend.token_to_id(bos) if bos else None, eos,
                                               backend.token_to_id(eos) if eos else None,
                                               bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token")))

        eos_ids = gen.get("eos_token_id")
        if isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        eos_ids = [i for i in (eos_ids or []) if isinstance(i, int)]
        names = cfg.get("model_input_names")
        return cls(backend, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
                   unk_token=tokens["unk_token"], pad_token=tokens["pad_token"],
                   extra_special={k: tokens[k] for k in ("cls_token", "sep_token", "mask_token")
                                  if tokens[k]},
                   chat_template=_chat_template_of(d, cfg), padding_side=cfg.get("padding_side", "right"),
                   model_max_length=cfg.get("model_max_length"), extra_eos_ids=eos_ids,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
                   token_type_ids=("token_type_ids" in names) if isinstance(names, list) else None,
                   source=str(d))

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """Build from a GGUF file's tokenizer metadata (`tokenizer.ggml.model` "gpt2" or "llama").

        Pass a `GGUFFile` (lmforge.gguf_file) or a `gguf.GGUFReader` to reuse one already open.
        """
        from lmforge.gguf_file import GGUFFile

        if isinstance(path_or_reader, (str, Path)):
            name = str(path_or_reader)
            if not Path(name).is_file():
                raise TokenizerError(f"{name}: file not found")
            try:
                reader = GGUFFile(name)  # lazy metadata: no object per token until the tokens are read
            except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
                raise TokenizerError(f"{name}: not a readable GGUF file ({_one_line(e)})") from None
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
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == _CONTROL and (control_ok is None or set(t) <= control_ok)]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                if ty == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        def tok(key: str) -> str | None:
            i = ids[key]
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = tok("bos"), tok("eos")
        backend.post_processor = _template(bos, ids["bos"], eos, ids["eos"], add_bos, add_eos)
        extra_eos = [ids[k] for k in ("eot", "eom") if ids[k] is not None]
        extra_eos += [i for i, (t, ty) in enumerate(zip(tokens, types))
                      if ty == _CONTROL and t in _END_OF_TURN]
        ctx = _gguf_value(reader, f"{arch}.context_length") if arch else None
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=tok("unknown"), pad_token=tok("padding"),
                   chat_template=_gguf_value(reader, "tokenizer.chat_template"),
                   model_max_length=int(ctx) if ctx else None, add_bos=add_bos and bos is not None,
                   extra_eos_ids=extra_eos, token_type_ids=False, source=name)

    @classmethod
    def train_bpe(cls, data: str | Path | Iterable[str | Path], vocab_size: int,
                  special_tokens: Sequence[str] = (ENDOFTEXT,), *, min_frequency: int = 2,
                  bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                  show_progress: bool = False) -> Tokenizer:
        """Train a GPT-2 style byte-level BPE on files (paths) or an iterator of texts.

        Special tokens take the first ids; `<|endoftext|>` becomes BOS/EOS unless others are named.
        """
        specials = list(dict.fromkeys(special_tokens))
        if vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size={vocab_size} is smaller than the 256-byte alphabet "
                                 f"+ {len(specials)} special tokens")
        for key, t in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if t is not None and t not in specials:
                raise TokenizerError(f"train_bpe: {key} {t!r} is not one of special_tokens {specials}")
        if eos_token is None and ENDOFTEXT in specials:
            eos_token = ENDOFTEXT
            bos_token = bos_token or ENDOFTEXT

        backend = Backend(BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=show_progress)
        files = _as_files(data)
        if files is not None:
            backend.train([str(f) for f in files], trainer)
        else:
            backend.train_from_iterator((t for t in data), trainer)
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, add_bos=False,
                   source="train_bpe")


# ------------------------------------------------------------------------------------------ builders

def _load_backend(path: Path) -> Backend:
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found")
    _read_json(path)  # a clear message for broken JSON before the Rust parser's
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exception
        raise TokenizerError(f"{path}: not a tokenizers tokenizer.json ({_one_line(e)})") from None


def _byte_level_backend(vocab_json: Path, merges_txt: Path) -> Backend:
    vocab = _read_json(vocab_json)
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
        raise TokenizerError(f"{merges_txt}: merges do not fit {vocab_json.name} ({_one_line(e)})") from None
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = _template(None, None, None, None, False, False)
    return backend


def _wordpiece_backend(vocab_txt: Path, cfg: dict) -> Backend:
    """BERT's tokenizer from vocab.txt, with the normalizer options tokenizer_config.json gives."""
    vocab: dict[str, int] = {}
    lines = vocab_txt.read_text(encoding="utf-8").split("\n")  # one token per line; not splitlines(): U+2028..
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines):
        vocab.setdefault(line.rstrip("\r"), i)
    unk = _token_text(cfg.get("unk_token")) or "[UNK]"
    cls_tok, sep = _token_text(cfg.get("cls_token")) or "[CLS]", _token_text(cfg.get("sep_token")) or "[SEP]"
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


def _chat_template_of(d: Path, cfg: dict) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if isinstance(tpl, str) and tpl:
        return tpl
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        tpl = _read_json(d / "chat_template.json").get("chat_template")
        return tpl if isinstance(tpl, str) else None
    return None


def _gguf_byte_level(reader, tokens: list[str], name: str) -> tuple[Backend, set[str]]:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges and split regex."""
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    raw = _gguf_value(reader, "tokenizer.ggml.merges")
    if raw is None:
        raise TokenizerError(f"{name}: byte-level GGUF tokenizer without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in raw]
    backend = Backend(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                          fuse_unk=False))
    split = _GGUF_SPLITS.get(_gguf_value(reader, "tokenizer.ggml.pre") or "")
    if split is None:  # GPT-2's own regex (what transformers uses for the other `pre` names too)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                         prepend_scheme="first" if prefix else "never",
                                                         split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _as_files(data) -> list[Path] | None:
    """Paths to train on, or None when `data` is an iterator of texts."""
    if isinstance(data, (str, Path)):
        items = [data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, (str, Path)) for x in data) \
            and (any(isinstance(x, Path) for x in data) or all(Path(x).is_file() for x in data)):
        items = list(data)
    else:
        return None
    files = [Path(x) for x in items]
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f}: training file not found")
    return files
