"""What a server is configured with: its limits and access rules (ServeSettings), the embedding model
(Embedder), and the decode-step modes it runs. No fastapi here, so the CLI can check flags before loading it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import ConfigError, LmforgeError, TokenizerError

ORIGIN = re.compile(r"^https?://[^/\s]+$")

# The server's batch-1 step is traced or eager (serve/engine.py), never torch.compile'd: no "on" here.
SERVER_COMPILE = ("auto", "trace", "off")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only: what an unauthenticated admin call needs."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_compile(mode: str) -> str:
    """A Generator's compile mode -> the server's, or ConfigError for a mode the server cannot run."""
    if mode not in SERVER_COMPILE:
        raise ConfigError(f"serve: compile {mode!r} is not a mode of the server's decode step; use one of "
                          f"{' | '.join(SERVER_COMPILE)} (it traces batch-1 steps and has no torch.compile path)")
    return mode


@dataclass
class ServeSettings:
    """Limits, names and access rules; every limit answers a clear 4xx when exceeded (see docs/serving.md)."""

    model_name: str | None = None  # id in /v1/models (default: the generator's name, without its folders)
    embedder_name: str | None = None
    classifier_name: str | None = None
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`
    max_concurrent: int = 16  # generations run together (rows of one batch)
    max_queue: int = 64  # generations that may wait beyond those; more get 429
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (lowered to fit the context)
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_body_bytes: int = 1 << 20
    max_inputs: int = 256  # texts per /v1/embeddings or /v1/classify request
    prefix_cache_mb: int = 256  # keys/values of earlier prompts kept for reuse by the next chat turn (0 = off)
    host: str = "127.0.0.1"  # the bound address: a Host header naming it is accepted, as are the localhost names
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names ("*" any, ".example.com" a domain)
    cors_origin: str | None = None  # the one origin that gets CORS headers ("*" any); none by default
    max_adapters: int = 8  # LoRA adapters loaded at once over the base (serve/adapters.py)
    batch_invariant: bool = True  # a request's tokens and logprobs do not depend on the other requests' rows
    prefill_chunk: int = 128  # prompt tokens per prefill forward, between decode steps (0: whole prompts)
    prefix_grain: int = 16  # a prompt shorter than a chunk prefills in pieces of this many tokens (0: one piece)
    speculative: str = "auto"  # what a request's speculative "auto" means: auto | off | prompt-lookup (speculate.py)

    def validate(self) -> None:
        for name in ("max_concurrent", "max_tokens", "default_max_tokens", "max_body_bytes", "max_inputs",
                     "max_adapters"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise LmforgeError(f"serve: prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        if self.prefill_chunk < 0:
            raise LmforgeError(f"serve: prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.prefix_grain < 0 or (self.prefix_grain and self.prefill_chunk % self.prefix_grain):
            raise LmforgeError(f"serve: prefix_grain {self.prefix_grain} must be 0 or divide prefill_chunk "
                               f"{self.prefill_chunk}")
        if self.speculative not in ("auto", "off", "prompt-lookup"):
            raise LmforgeError(f"serve: speculative {self.speculative!r} is not one of auto | off | prompt-lookup")
        if self.max_queue < 0:
            raise LmforgeError(f"serve: max_queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise LmforgeError(f"serve: max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for h in self.allowed_hosts:
            if not h.strip() or "/" in h or any(c.isspace() for c in h):
                raise LmforgeError(f"serve: allowed_hosts entry {h!r} is not a host name (e.g. myserver.lan)")
        if self.cors_origin is not None and self.cors_origin != "*" and not ORIGIN.match(self.cors_origin):
            raise LmforgeError(f"serve: cors_origin {self.cors_origin!r} is not an origin: give scheme://host[:port] "
                               "without a path (e.g. https://example.com), or *")


@dataclass
class Embedder:
    """A model + tokenizer used for /v1/embeddings."""

    model: Any
    tokenizer: Any
    name: str = "embedder"

    @classmethod
    def load(cls, name: str, device: str = "cpu") -> Embedder:
        from lmforge.checkpoints import load

        model, tok = load(name, device=device)
        if tok is None:
            raise TokenizerError(f"{name}: no tokenizer files: cannot embed text")
        return cls(model, tok, name)

    @classmethod
    def of(cls, embedder) -> Embedder | None:
        """An Embedder, a (model, tokenizer) pair, anything with .model/.tokenizer, or None."""
        if embedder is None or isinstance(embedder, Embedder):
            return embedder
        if isinstance(embedder, tuple):
            return cls(*embedder)
        return cls(embedder.model, embedder.tokenizer, getattr(embedder, "name", "embedder"))
