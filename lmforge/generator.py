"""Text in, text out: `Generator` wraps a model and its tokenizer with chat templates, prompt encoding (left
padding, truncation), stop strings and streaming around lmforge.decoding. The one engine that the CLI, the server
and the tasks use; it owns the DecodeRuntime its decode steps share."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from lmforge.checkpoints import as_dtype, load, load_checkpoint
from lmforge.decoding.loop import generate, stream_tokens
from lmforge.decoding.sampling import GenerationConfig, stop_ids
from lmforge.decoding.step import DecodeOptions, DecodeRuntime, decode_plan
from lmforge.decoding.stream import TextStreamer
from lmforge.errors import GenerationError, TokenizerError
from lmforge.model.transformer import Transformer
from lmforge.quant import DECODE_PRESETS, QuantLinear, quantize_model


class Generator:
    """Text in, text out: tokenization, chat templates, stop strings and streaming around the decoders above.
    The one engine that the CLI, the server and the tasks use."""

    def __init__(self, model: Transformer, tokenizer, name: str = "", compile: str = "auto") -> None:
        if tokenizer is None:
            raise TokenizerError(f"{name or 'model'}: no tokenizer found, cannot generate text")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.compile = DecodeOptions(compile).compile  # checked; a per-call compile=... overrides it
        self._runtime = DecodeRuntime(model)  # what this Generator's decode steps captured (traces, compiles)
        self.decode_step = "eager (nothing decoded yet)"  # what the last call ran, and why (DecodeOptions.path)

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
             quantize: int | str | None = "auto", compile: str = "auto") -> Generator:
        """quantize="auto": a quantized GGUF decodes on the int4/int8 path matching each tensor's type (exact for
        Q4_0/Q4_1/Q4_K blocks); other checkpoints in float. "none" / None, or an explicit dtype with "auto":
        full precision. 8 or 4: quantize the float weights with DECODE_PRESETS. compile: the decode step,
        "auto" | "on" | "off" (see DecodeOptions: "auto" compiles a shape once it has enough steps to run).
        device: "cpu", "cuda[:N]" or "auto". The int4/int8 kernels are CPU code, so on a GPU "auto" loads the
        dequantized weights, in bfloat16 unless `dtype` says otherwise (lmforge.device.inference_dtype)."""
        from lmforge.device import resolve_device

        dev = resolve_device(device, "device")
        mode, dtype = decode_plan(quantize, dtype, dev)
        device = str(dev)
        if mode == "auto":
            ck = load_checkpoint(name_or_path, dtype=as_dtype(dtype), device=device, quantized=True)
            model, tok = ck.model, ck.tokenizer
        else:
            model, tok = load(name_or_path, dtype=dtype, device=device)
        if isinstance(mode, int):
            model = quantize_model(model, **DECODE_PRESETS[mode])
        return cls(model, tok, str(name_or_path), compile=compile)

    @property
    def runtime(self) -> DecodeRuntime:
        """The DecodeRuntime of `self.model`; a new one when the model object was replaced (its captures belong to
        the old one)."""
        if self._runtime.model is not self.model:
            self._runtime = DecodeRuntime(self.model)
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: DecodeRuntime) -> None:
        if runtime.model is not self.model:
            raise GenerationError("Generator.runtime: the DecodeRuntime belongs to another model")
        self._runtime = runtime

    @property
    def runs_on(self) -> str:
        """Where and in what the model decodes, e.g. "cpu, int4 weights" or "cuda:0, bfloat16 weights"."""
        p = next(self.model.parameters())
        bits = sorted({m.bits for m in self.model.modules() if isinstance(m, QuantLinear)})
        kind = "/".join(f"int{b}" for b in bits) if bits else str(p.dtype).removeprefix("torch.")
        return f"{p.device}, {kind} weights"

    # -- prompts
    def format_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template, or a plain instruction format for base models without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        parts = []
        for m in messages:
            role = m.get("role", "user")
            parts.append(m["content"].strip() if role in ("user", "system") else f"Response: {m['content'].strip()}")
        return "\n\n".join(parts) + ("\n\nResponse:" if add_generation_prompt else "")

    def _encode(self, prompts: list[str], add_special_tokens: bool, max_new_tokens: int,
                truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> left-padded (B, T) ids and mask, leaving room for max_new_tokens in the context."""
        if any(not p.strip() for p in prompts):
            raise GenerationError("empty prompt: give some text")
        ids = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        room = self.model.cfg.context_length - max_new_tokens
        if room <= 0:
            raise GenerationError(f"max_new_tokens {max_new_tokens} leaves no room in the context length "
                                  f"{self.model.cfg.context_length}")
        for i, row in enumerate(ids):
            if len(row) > room:
                if not truncate:
                    raise GenerationError(
                        f"prompt of {len(row)} tokens + max_new_tokens {max_new_tokens} exceeds the context length "
                        f"{self.model.cfg.context_length} (shorten it, or pass truncate=True / --truncate to keep "
                        "its last tokens)")
                logging.getLogger("lmforge").warning("prompt %d truncated from %d to its last %d tokens", i,
                                                     len(row), room)
                ids[i] = row[-room:]
        T = max(map(len, ids))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        dev = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in ids], device=dev)  # (B, T) left padding
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids], device=dev)  # (B, T)
        return input_ids, mask

    def _decode_options(self, compile: str | None) -> DecodeOptions:
        return DecodeOptions(self.compile if compile is None else compile)

    def _streamer(self, gc: GenerationConfig) -> TextStreamer:
        return TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)

    def stream(self, prompt: str, *, chat: bool = False, add_special_tokens: bool | None = None,
               truncate: bool = False, compile: str | None = None, **gen) -> Iterator[str]:
        """Yield text pieces as they are decoded (never half a character; stop strings are cut).
        compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's)."""
        opts = self._decode_options(compile)
        gc = GenerationConfig(**gen)
        gc.validate()
        text = self.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode([text], special, gc.max_new_tokens, truncate)
        streamer = self._streamer(gc)
        stop = set(stop_ids(self.model, gc))
        for tok, done in stream_tokens(self.model, ids, mask, gc, opts, self.runtime):
            self.decode_step = opts.path  # set once the stepper is built; a failed compile changes it
            t = int(tok[0])
            if bool(done[0]) or t in stop:
                break
            piece = streamer.put(t)
            if piece:
                yield piece
            if streamer.stopped:
                return
        tail = streamer.end()
        if tail:
            yield tail

    def generate(self, prompt: str | list[str], *, chat: bool = False, add_special_tokens: bool | None = None,
                 truncate: bool = False, compile: str | None = None, **gen) -> str | list[str]:
        """Complete one prompt (-> str) or a batch (-> list[str], left-padded together).
        compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's)."""
        opts = self._decode_options(compile)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        gc = GenerationConfig(**gen)
        gc.validate()
        texts = [self.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode(texts, special, gc.max_new_tokens, truncate)
        stop = set(stop_ids(self.model, gc))
        outs = []
        rows = generate(self.model, ids, mask, gc, opts, self.runtime)
        self.decode_step = opts.path
        for row in rows:
            row = row[:-1] if row and row[-1] in stop else row
            st = self._streamer(gc)
            outs.append("".join(st.put(t) for t in row) + st.end())
        return outs[0] if single else outs

    def chat(self, messages: list[dict[str, str]], **gen) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        gen.setdefault("max_new_tokens", 256)
        return self.generate(self.format_chat(messages), add_special_tokens=False, **gen)

    def chat_stream(self, messages: list[dict[str, str]], **gen) -> Iterator[str]:
        gen.setdefault("max_new_tokens", 256)
        prompt = self.format_chat(messages)
        yield from self.stream(prompt, add_special_tokens=False, **gen)
