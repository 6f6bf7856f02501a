"""`Tokenizer`: encode, decode, batch and chat-template on top of a `tokenizers.Tokenizer` (the Rust library
tokenizes). Loads a tokenizer.json, a Hugging Face directory (tokenizer.json, vocab.json + merges.txt or a BERT
vocab.txt, plus tokenizer_config.json / special_tokens_map.json / generation_config.json) or a GGUF file."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from lmforge.errors import TokenizerError
from lmforge.io import atomic_write
from lmforge.tokenizer.backends import (
    ENDOFTEXT,
    bos_eos_processor,
    byte_alphabet,
    byte_level_backend,
    chat_template_of,
    load_backend,
    one_line,
    read_json_opt,
    token_text,
    wordpiece_backend,
)
from lmforge.tokenizer.chat_template import render_chat_template
from lmforge.tokenizer.gguf import load_gguf
from lmforge.tokenizer.train import train_bpe_backend

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")  # what from_dir builds from
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
# transformers writes this "no limit" sentinel (int(1e30)) as model_max_length; we read it as None.
_NO_LIMIT = 10**12
_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}


def _clean_up_spaces(text: str) -> str:
    """Undo the spaces a word-level decoder puts before punctuation and English contractions."""
    for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, tight)
    return text


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
            inverse = {c: b for b, c in byte_alphabet().items()}
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
                raise TokenizerError(f"encode_batch: {one_line(e)}") from None
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
        text = render_chat_template(source, context, which)
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
        backend = load_backend(p)
        if "pad_token" not in kwargs and backend.padding:
            kwargs["pad_token"] = backend.padding.get("pad_token")
        kwargs.setdefault("source", str(p))
        return cls(backend, **kwargs)

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> Tokenizer:
        """GPT-2 style byte-level BPE; `<|endoftext|>` is BOS, EOS and UNK when the vocabulary has it."""
        backend = byte_level_backend(Path(vocab_json), Path(merges_txt))
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
        cfg = read_json_opt(d / "tokenizer_config.json")
        specials_map = read_json_opt(d / "special_tokens_map.json")
        gen = read_json_opt(d / "generation_config.json")
        if (d / "tokenizer.json").is_file():
            backend = load_backend(d / "tokenizer.json")
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            backend = byte_level_backend(d / "vocab.json", d / "merges.txt")
        elif (d / "vocab.txt").is_file():
            backend = wordpiece_backend(d / "vocab.txt", cfg)
        else:
            raise TokenizerError(f"{d}: no tokenizer files "
                                 "(tokenizer.json, vocab.json + merges.txt or vocab.txt)")

        tokens = {k: token_text(cfg.get(k)) or token_text(specials_map.get(k)) for k in SPECIAL_KEYS}
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
            backend.post_processor = bos_eos_processor(bos, backend.token_to_id(bos) if bos else None, eos,
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
                   chat_template=chat_template_of(d, cfg), padding_side=cfg.get("padding_side", "right"),
                   model_max_length=cfg.get("model_max_length"), extra_eos_ids=eos_ids,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
                   token_type_ids=("token_type_ids" in names) if isinstance(names, list) else None,
                   source=str(d))

    @classmethod
    def from_dir_if_present(cls, path: str | Path) -> Tokenizer | None:
        """`from_dir`, or None when the directory holds no tokenizer files at all: a model directory without a
        tokenizer is still a model, but a tokenizer file that is there and broken is an error naming it."""
        d = Path(path)
        if not any((d / name).is_file() for name in TOKENIZER_FILES):
            return None
        return cls.from_dir(d)

    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """Build from a GGUF file's tokenizer metadata (`tokenizer.ggml.model` "gpt2" or "llama").

        Pass a `GGUFFile` (lmforge.gguf_file) or a `gguf.GGUFReader` to reuse one already open.
        """
        backend, kwargs = load_gguf(path_or_reader)
        return cls(backend, **kwargs)

    @classmethod
    def train_bpe(cls, data: str | Path | Iterable[str | Path], vocab_size: int,
                  special_tokens: Sequence[str] = (ENDOFTEXT,), *, min_frequency: int = 2,
                  bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                  show_progress: bool = False) -> Tokenizer:
        """Train a GPT-2 style byte-level BPE on files (paths) or an iterator of texts.

        Special tokens take the first ids; `<|endoftext|>` becomes BOS/EOS unless others are named.
        """
        backend, kwargs = train_bpe_backend(data, vocab_size, special_tokens, min_frequency=min_frequency,
                                            bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                                            show_progress=show_progress)
        return cls(backend, **kwargs)
