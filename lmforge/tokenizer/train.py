"""Training a GPT-2 style byte-level BPE tokenizer with the `tokenizers` trainer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from lmforge.errors import TokenizerError
from lmforge.tokenizer.backends import ENDOFTEXT


def train_bpe_backend(data: str | Path | Iterable[str | Path], vocab_size: int,
                      special_tokens: Sequence[str] = (ENDOFTEXT,), *, min_frequency: int = 2,
                      bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                      show_progress: bool = False) -> tuple[Backend, dict[str, Any]]:
    """A trained backend and its `Tokenizer(...)` keyword arguments (see `Tokenizer.train_bpe`)."""
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
    return backend, dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, add_bos=False,
                         source="train_bpe")


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
