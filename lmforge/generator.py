"""Text in, text out: `Generator` wraps a model and its tokenizer with chat templates, prompt encoding (left
padding, truncation), stop strings and streaming around lmforge.decoding. The one engine that the CLI, the server
and the tasks use; it owns the DecodeRuntime its decode steps share."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from lmforge.checkpoints import as_dtype, load, load_checkpoint
from lmforge.decoding.constraints import ConstraintCompiler, constraint_options
from lmforge.decoding.loop import generate, stream_tokens
from lmforge.decoding.sampling import GenerationConfig, stop_ids
from lmforge.decoding.speculative import (
    DEFAULT_DRAFT_TOKENS,
    SpeculativeOptions,
    check_draft,
    resolve_speculative,
    speculative_tokens,
)
from lmforge.decoding.step import DecodeOptions, DecodeRuntime, decode_plan
from lmforge.decoding.stream import TextStreamer
from lmforge.errors import GenerationError, TokenizerError
from lmforge.model.transformer import Transformer
from lmforge.quant import DECODE_PRESETS, QuantLinear, quantize_model


class Generator:
    """Text in, text out: tokenization, chat templates, stop strings and streaming around the decoders above.
    The one engine that the CLI, the server and the tasks use."""

    def __init__(self, model: Transformer, tokenizer, name: str = "", compile: str = "auto",
                 invariant: bool = True) -> None:
        if tokenizer is None:
            raise TokenizerError(f"{name or 'model'}: no tokenizer found, cannot generate text")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.compile = DecodeOptions(compile).compile  # checked; a per-call compile=... overrides it
        # batch invariance (GenerationConfig.invariant) for calls that do not pass invariant=: a prompt's text is
        # the same alone and in any batch (docs/generation.md, "Batch invariance")
        self.invariant = invariant
        self._runtime = DecodeRuntime(model)  # what this Generator's decode steps captured (traces, compiles)
        self.decode_step = "eager (nothing decoded yet)"  # what the last call ran, and why (DecodeOptions.path)
        # speculative decoding (decoding/speculative.py): the default for calls that pass speculative=None, the
        # draft model set_draft attached, k, and the last call's counters (None: it did not speculate)
        self.speculative, self.draft, self.draft_tokens = "off", None, DEFAULT_DRAFT_TOKENS
        self.last_speculative: SpeculativeOptions | None = None
        self.finish_reasons: list[str] = []  # per row of the last generate(): "stop" | "length" (cut by max_new_tokens)
        self._constraints: ConstraintCompiler | None = None

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
             quantize: int | str | None = "auto", compile: str = "auto", invariant: bool = True) -> Generator:
        """quantize="auto": a quantized GGUF decodes on the int4/int8 path matching each tensor's type (exact for
        Q4_0/Q4_1/Q4_K blocks); other checkpoints in float. "none" / None, or an explicit dtype with "auto":
        full precision. 8 or 4: quantize the float weights with DECODE_PRESETS. compile: the decode step,
        "auto" | "on" | "off" (see DecodeOptions: "auto" compiles a shape once it has enough steps to run).
        device: "cpu", "cuda[:N]" or "auto". The int4/int8 kernels are CPU code, so on a GPU "auto" loads the
        dequantized weights, in bfloat16 unless `dtype` says otherwise (lmforge.device.inference_dtype).
        invariant: batch-invariant generate / stream calls by default (a call's invariant= overrides it; CPU: a
        GPU batch runs without); under it "auto" traces but never compiles the decode step."""
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
        return cls(model, tok, str(name_or_path), compile=compile, invariant=invariant)

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

    @property
    def constraints(self) -> ConstraintCompiler:
        """The compiler (and cache) of json_schema / regex / grammar / choices constraints for this tokenizer;
        built on first use (the library's vocabulary takes about a second)."""
        if self._constraints is None or self._constraints.tokenizer is not self.tokenizer:
            self._constraints = ConstraintCompiler(self.tokenizer, self.model.cfg.vocab_size)
        return self._constraints

    def _config(self, gen: dict) -> GenerationConfig:
        """GenerationConfig from the keyword options; json_schema / regex / grammar (Lark or GBNF text) /
        choices compile into its constraint (ConstraintError when the library cannot compile them)."""
        opts = {k: gen.pop(k) for k in ("json_schema", "regex", "grammar", "choices") if k in gen}
        gc = GenerationConfig(**{"invariant": self.invariant, **gen})
        picked = constraint_options(**opts)
        if picked is not None:
            gc.constraint = self.constraints.compile(*picked)
        gc.validate()
        return gc

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

    # -- speculative decoding
    def set_draft(self, draft: Generator | None, name: str = "draft") -> None:
        """Attach a draft model (another Generator of the same tokenizer; refused in one line otherwise) for
        speculative="draft" (and "auto"); None detaches it."""
        if draft is not None:
            check_draft(self.model, self.tokenizer, draft.model, draft.tokenizer, name)
        self.draft = draft

    def _speculation(self, method: str | None, draft_tokens: int | None, batch: int,
                     gc: GenerationConfig, quoting: bool = False) -> SpeculativeOptions | None:
        """This call's speculative options, or None to decode without (see resolve_speculative)."""
        if getattr(gc, "constraint", None) is not None:  # a constraint masks each step: not verified here
            if method not in (None, "auto", "off") or self.speculative not in ("auto", "off"):
                raise GenerationError("speculative decoding with a constraint is not supported: speculative='off'")
            return None
        quantized = any(isinstance(m, QuantLinear) for m in self.model.modules())
        mode = resolve_speculative(self.speculative if method is None else method, batch, gc, self.draft is not None,
                                   quantized, quoting)
        if mode == "off":
            return None
        return SpeculativeOptions(mode, draft_tokens or self.draft_tokens,
                                  draft=self.draft.model if mode == "draft" else None)

    def _speculative_rows(self, ids: torch.Tensor, mask: torch.Tensor, gc: GenerationConfig,
                          opts: DecodeOptions, spec: SpeculativeOptions) -> list[list[int]]:
        """Each row decoded alone (its padding dropped) by speculative_tokens; the counters add up in `spec`."""
        rows = []
        for r in range(ids.shape[0]):
            row = ids[r: r + 1, int((mask[r] == 0).sum()):]  # (1, T_r)
            rgc = replace(gc, seed=gc.seeds[r], seeds=None) if gc.seeds is not None else gc  # the row's own seed
            rows.append(list(speculative_tokens(self.model, row, rgc, spec, opts, self.runtime)))
        return rows

    def _decode_options(self, compile: str | None) -> DecodeOptions:
        return DecodeOptions(self.compile if compile is None else compile)

    def _streamer(self, gc: GenerationConfig) -> TextStreamer:
        return TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)

    def stream(self, prompt: str, *, chat: bool = False, add_special_tokens: bool | None = None,
               truncate: bool = False, compile: str | None = None, speculative: str | None = None,
               draft_tokens: int | None = None, quoting: bool = False, **gen) -> Iterator[str]:
        """Yield text pieces as they are decoded (never half a character; stop strings are cut).
        compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's). speculative / draft_tokens
        / quoting: as in generate."""
        opts = self._decode_options(compile)
        gc = self._config(gen)
        text = self.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode([text], special, gc.max_new_tokens, truncate)
        streamer = self._streamer(gc)
        stop = set(stop_ids(self.model, gc))
        spec = self.last_speculative = self._speculation(speculative, draft_tokens, 1, gc, quoting)
        steps = (stream_tokens(self.model, ids, mask, gc, opts, self.runtime) if spec is None else
                 ((torch.tensor([t]), torch.tensor([False]))
                  for t in speculative_tokens(self.model, ids, gc, spec, opts, self.runtime)))
        self.finish_reasons = ["length"]  # until a stop id or stop string ends it
        for tok, done in steps:
            self.decode_step = opts.path  # set once the stepper is built; a failed compile changes it
            t = int(tok[0])
            if bool(done[0]) or t in stop:
                self.finish_reasons = ["stop"]
                break
            piece = streamer.put(t)
            if piece:
                yield piece
            if streamer.stopped:
                self.finish_reasons = ["stop"]
                return
        tail = streamer.end()
        if tail:
            yield tail

    def generate(self, prompt: str | list[str], *, chat: bool = False, add_special_tokens: bool | None = None,
                 truncate: bool = False, compile: str | None = None, speculative: str | None = None,
                 draft_tokens: int | None = None, quoting: bool = False, **gen) -> str | list[str]:
        """Complete one prompt (-> str) or a batch (-> list[str], left-padded together).
        speculative: "off" | "prompt-lookup" | "draft" (the model set_draft attached) | "auto" (the draft when
        attached, else prompt lookup for one prompt, else off); None = the Generator's `speculative`. A
        speculating batch decodes row by row; greedy text is that of decoding each row alone without speculation
        (docs/generation.md), and `last_speculative` holds the acceptance counters. draft_tokens: k per forward.
        quoting: the output copies much of the prompt (an answer from a context), so "auto" uses prompt lookup
        for one prompt on quantized weights too, where it measured faster on such outputs.
        invariant: each row's text is what its prompt gives alone (default: the Generator's `invariant`; an
        explicit compile="on" is not invariant). seed: every row's own generator starts from it; seeds: one per
        row instead. compile: this call's decode step ("auto" | "on" | "off"; None = the Generator's). json_schema
        (a dict or JSON text), regex, grammar (Lark or GBNF) or choices (a list of strings): every row's output
        follows it; `finish_reasons` then tells a complete one ("stop") from one cut by max_new_tokens ("length")."""
        opts = self._decode_options(compile)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        gc = self._config(gen)
        texts = [self.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode(texts, special, gc.max_new_tokens, truncate)
        stop = set(stop_ids(self.model, gc))
        outs = []
        spec = self.last_speculative = self._speculation(speculative, draft_tokens, len(prompts), gc, quoting)
        rows = (generate(self.model, ids, mask, gc, opts, self.runtime) if spec is None
                else self._speculative_rows(ids, mask, gc, opts, spec))
        self.decode_step = opts.path
        self.finish_reasons = []
        for row in rows:
            ended = bool(row) and row[-1] in stop
            row = row[:-1] if ended else row
            st = self._streamer(gc)
            outs.append("".join(st.put(t) for t in row) + st.end())
            self.finish_reasons.append("stop" if ended or st.stopped else "length")
        return outs[0] if single else outs

    def chat(self, messages: list[dict[str, str]], **gen) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        gen.setdefault("max_new_tokens", 256)
        return self.generate(self.format_chat(messages), add_special_tokens=False, **gen)

    def chat_stream(self, messages: list[dict[str, str]], **gen) -> Iterator[str]:
        gen.setdefault("max_new_tokens", 256)
        prompt = self.format_chat(messages)
        yield from self.stream(prompt, add_special_tokens=False, **gen)
