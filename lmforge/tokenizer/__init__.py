"""Tokenization: `Tokenizer` wraps `tokenizers.Tokenizer` (the Rust library tokenizes; we load, batch, template).

Modules: backends (tokenizers backends from HF / GPT-2 / BERT files), chat_template (the jinja2 sandbox),
gguf (a tokenizer from GGUF metadata, the original tokenizer's ids), train (BPE training), core (`Tokenizer`).
"""

from lmforge.tokenizer.backends import ENDOFTEXT
from lmforge.tokenizer.core import SPECIAL_KEYS, Tokenizer

__all__ = ["ENDOFTEXT", "SPECIAL_KEYS", "Tokenizer"]
