"""Autoregressive decoding with a preallocated KV cache: greedy, sampling (temperature, top-k, top-p,
min-p, repetition penalty), beam search, stop tokens, left-padded batches, and a token stream.

The per-token loop runs one forward of one new token per row; masks, positions and sampling are tensor
ops, so Python overhead stays small next to the matmuls. Text-level concerns (stop strings, streaming
text without splitting a multi-byte character) live in TextStreamer, on top of token ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoints import as_dtype, load, load_checkpoint
from lmforge.errors import GenerationError, TokenizerError
from lmforge.model.layers import KVCache
from lmforge.model.transformer import Transformer
from lmforge.quant import DECODE_PRESETS, decode_quantize, quantize_model


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest top set whose probability reaches top_p
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in the output (the prompt may be quoted)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / generated_len ** length_penalty
    early_stopping: bool = False  # beam search: stop as soon as num_beams hypotheses are finished
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None = the model's eos ids
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise GenerationError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise GenerationError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise GenerationError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise GenerationError("beam search with sampling is not supported: set temperature=0 or num_beams=1")
        if any(not s for s in self.stop_strings):
            raise GenerationError("stop_strings must not contain an empty string")


# ---- logits processing ---------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Divide positive, multiply negative scores (CTRL paper, as HF)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """logits (B, V); generated (B, L) output ids so far. Forbid each token that would complete an n-gram the
    output already holds: loops are cut while the prompt stays free to quote (unlike transformers)."""
    L = generated.shape[1]
    if n <= 0 or L < n:
        return logits
    windows = generated.unfold(1, n, 1)  # (B, L-n+1, n)
    prefix = generated[:, L - n + 1:]  # (B, n-1): what the next token would extend
    hit = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (B, L-n+1)
    banned = torch.zeros_like(logits).scatter_add_(1, windows[..., -1], hit.to(logits.dtype))  # (B, V)
    return logits.masked_fill(banned > 0, torch.finfo(logits.dtype).min)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k / top-p / min-p sets (in that order); (B, V) -> (B, V)."""
    neg = torch.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, neg)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # ascending
        drop_sorted = cum <= (1 - top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg)
    return logits


def next_token(logits: torch.Tensor, gc: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or a sample from the filtered distribution."""
    if gc.temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits / gc.temperature, gc.top_k, gc.top_p, gc.min_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# ---- helpers ---------------------------------------------------------------------------------------
def _check(model: Transformer, input_ids: torch.Tensor, gc: GenerationConfig) -> None:
    gc.validate()
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise GenerationError("empty prompt: give at least one token")
    total = input_ids.shape[1] + gc.max_new_tokens
    if total > model.cfg.context_length:
        raise GenerationError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens {gc.max_new_tokens} exceeds the model's "
            f"context length {model.cfg.context_length}"
        )


def _stop_ids(model: Transformer, gc: GenerationConfig) -> list[int]:
    return list(gc.stop_token_ids) if gc.stop_token_ids is not None else model.cfg.eos_ids


class _Stepper:
    """Owns the cache and mask of one batch; `step(tokens)` feeds one token per row, returns logits (B, V)."""

    def __init__(self, model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new: int) -> None:
        B, T = input_ids.shape
        self.model, self.T = model, T
        dev = input_ids.device
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.cfg, B, T + max_new, device=dev, dtype=dtype)
        self.mask = torch.ones(B, T + max_new, dtype=torch.long, device=dev)
        if attention_mask is not None:
            self.mask[:, :T] = attention_mask.to(dev)
        # with no padding the model's cheaper mask-free path is exact
        self.padded = attention_mask is not None and bool((attention_mask == 0).any())
        self.pos = (self.mask[:, :T].sum(-1, keepdim=True) - 1) if self.padded else None  # (B, 1)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids, self.mask[:, : self.T] if self.padded else None, cache=self.cache)
        return self.model.lm_logits(h[:, -1]).float()  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        S = self.cache.length + 1
        if self.padded:
            self.pos = self.pos + 1
            h = self.model(tokens[:, None], self.mask[:, :S], position_ids=self.pos, cache=self.cache)
        else:
            h = self.model(tokens[:, None], cache=self.cache)
        return self.model.lm_logits(h[:, -1]).float()  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        if self.pos is not None:
            self.pos = self.pos.index_select(0, index)


# ---- sampling / greedy -----------------------------------------------------------------------------
@torch.inference_mode()
def stream_tokens(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  gc: GenerationConfig | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) per step. A row that hit a stop id yields that id once,
    then is marked finished (later values in that row are padding to ignore)."""
    gc = gc or GenerationConfig()
    _check(model, input_ids, gc)
    if gc.num_beams > 1:
        raise GenerationError("stream_tokens does not do beam search; use beam_search()")
    gen = None
    if gc.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(gc.seed)
    B = input_ids.shape[0]
    stop = torch.tensor(_stop_ids(model, gc), dtype=torch.long, device=input_ids.device)
    stepper = _Stepper(model, input_ids, attention_mask, gc.max_new_tokens)
    seen = None
    if gc.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=input_ids.device)
        real = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -1)
        rows, cols = (real >= 0).nonzero(as_tuple=True)
        seen[rows, real[rows, cols]] = True
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = input_ids.new_empty(B, 0)  # (B, i): the output so far, for no_repeat_ngram_size
    logits = stepper.prefill(input_ids)
    for i in range(gc.max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, out, gc.no_repeat_ngram_size)
        tok = next_token(logits, gc, gen)  # (B,)
        if stop.numel():
            tok = torch.where(finished, stop[0], tok)
        if seen is not None:
            seen[torch.arange(B), tok] = True
        newly = torch.isin(tok, stop) if stop.numel() else torch.zeros_like(finished)
        if gc.no_repeat_ngram_size:
            out = torch.cat([out, tok[:, None]], 1)
        yield tok, finished.clone()
        finished = finished | newly
        if i == gc.max_new_tokens - 1 or bool(finished.all()):
            return
        logits = stepper.step(tok)


def generate(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             gc: GenerationConfig | None = None) -> list[list[int]]:
    """New token ids per row (the stop id included when one ended the row; nothing after it)."""
    gc = gc or GenerationConfig()
    if gc.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, gc)
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for tok, done in stream_tokens(model, input_ids, attention_mask, gc):
        for b, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
            if not d:
                out[b].append(t)
    return out


def greedy(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
           attention_mask: torch.Tensor | None = None, eos_ids: list[int] | None = None) -> torch.Tensor:
    """Greedy decoding, returns (B, T + new) like transformers' generate (finished rows padded with eos)."""
    gc = GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=eos_ids or [])
    steps = [tok for tok, _ in stream_tokens(model, input_ids, attention_mask, gc)]
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


# ---- beam search -----------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                gc: GenerationConfig | None = None) -> list[list[int]]:
    """Beam search with transformers' semantics (length penalty on the generated length, its early-stop
    heuristic), so the same ids come out. Returns the best hypothesis' new tokens per row."""
    gc = gc or GenerationConfig(num_beams=4)
    _check(model, input_ids, gc)
    B, T = input_ids.shape
    nb, dev = gc.num_beams, input_ids.device
    stop = torch.tensor(_stop_ids(model, gc), dtype=torch.long, device=dev)
    keep = max(2, 1 + stop.numel()) * nb  # candidates per row, so nb survive even if some finish
    top_nb = torch.arange(keep, device=dev) < nb  # (K,)
    NEG = -1.0e9

    ids = input_ids.repeat_interleave(nb, 0)  # (B*nb, T)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, 0)
    stepper = _Stepper(model, ids, mask, gc.max_new_tokens)
    max_new = gc.max_new_tokens
    run_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)  # generated tokens of running beams
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first one may expand at step 0
    fin_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_score = torch.full((B, nb), NEG, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    seen = None
    if gc.repetition_penalty != 1.0:
        seen = torch.zeros(B * nb, model.cfg.vocab_size, dtype=torch.bool, device=dev)
        real = ids if mask is None else ids.masked_fill(mask == 0, -1)
        rows, cols = (real >= 0).nonzero(as_tuple=True)
        seen[rows, real[rows, cols]] = True

    logits = stepper.prefill(ids)  # (B*nb, V)
    V = logits.shape[-1]
    batch_off = (torch.arange(B, device=dev) * nb)[:, None]  # (B, 1)
    for step in range(max_new):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, run_seq.view(B * nb, max_new)[:, :step], gc.no_repeat_ngram_size)
        logp = logits.log_softmax(-1).view(B, nb, V) + run_score[:, :, None]  # (B, nb, V)
        cand_score, cand_idx = torch.topk(logp.view(B, nb * V), keep)  # (B, K)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V  # (B, K)
        cand_seq = run_seq.gather(1, cand_beam[:, :, None].expand(B, keep, max_new)).clone()  # (B, K, L)
        cand_seq[:, :, step] = cand_tok
        last = step == max_new - 1
        hits = torch.isin(cand_tok, stop) if stop.numel() else torch.zeros_like(cand_tok, dtype=torch.bool)
        if last:
            hits = torch.ones_like(hits)  # max length reached: every candidate is final
        # running beams for the next step: the best nb candidates that did not finish
        run_cand = cand_score + hits.float() * NEG
        nxt = torch.topk(run_cand, nb).indices  # (B, nb)
        run_seq = cand_seq.gather(1, nxt[:, :, None].expand(B, nb, max_new))
        run_score = run_cand.gather(1, nxt)
        src_beam = (cand_beam.gather(1, nxt) + batch_off).view(-1)  # (B*nb,) rows of the cache to keep
        # finished hypotheses: candidates among the top nb that hit a stop, scored with the length penalty
        just_done = hits & top_nb[None, :]
        fscore = cand_score / float(step + 1) ** gc.length_penalty
        full = fin_done.all(-1, keepdim=True) & gc.early_stopping
        fscore = fscore + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
        m_seq = torch.cat([fin_seq, cand_seq], 1)
        m_score = torch.cat([fin_score, fscore], 1)
        m_len = torch.cat([fin_len, torch.full_like(cand_tok, step + 1)], 1)
        m_done = torch.cat([fin_done, just_done], 1)
        best = torch.topk(m_score, nb).indices  # (B, nb)
        fin_seq = m_seq.gather(1, best[:, :, None].expand(B, nb, max_new))
        fin_score, fin_len, fin_done = m_score.gather(1, best), m_len.gather(1, best), m_done.gather(1, best)
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        best_possible = run_score[:, :1] / float(step + 1) ** gc.length_penalty
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True).values, torch.full_like(fin_score, NEG))
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if last or not bool(improvable.any()) or (gc.early_stopping and bool(fin_done.all())) or bool(hits.all()):
            break
        stepper.reorder(src_beam)
        if seen is not None:
            seen = seen.index_select(0, src_beam)
            seen[torch.arange(B * nb), run_seq[:, :, step].reshape(-1)] = True
        logits = stepper.step(run_seq[:, :, step].reshape(-1))
    return [fin_seq[b, 0, : int(fin_len[b, 0])].tolist() for b in range(B)]


# ---- text streaming ---------------------------------------------------------------------------------
class TextStreamer:
    """Turns a growing list of token ids into text pieces: never splits a multi-byte character (a piece
    ending in U+FFFD waits for the next token) and holds back text that may be the start of a stop string."""

    def __init__(self, decode, stop_strings: list[str] | None = None) -> None:
        self.decode = decode  # list[int] -> str
        self.stop_strings = list(stop_strings or [])
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already given out
        self.stopped = False

    def put(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (may be '')."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for its remaining bytes
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            piece, self.emitted = text[self.emitted:cut], cut
            return piece
        safe = len(text) - self._held(text)
        piece = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def end(self) -> str:
        """Flush what was held back at the end of generation."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self.stop_strings if (i := text.find(s, max(0, self.emitted - len(s)))) >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        held = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held


# ---- text in, text out --------------------------------------------------------------------------------
class Generator:
    """Text in, text out: tokenization, chat templates, stop strings and streaming around the decoders above.
    The one engine that the CLI, the server and the tasks use."""

    def __init__(self, model: Transformer, tokenizer, name: str = "") -> None:
        if tokenizer is None:
            raise TokenizerError(f"{name or 'model'}: no tokenizer found, cannot generate text")
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
             quantize: int | str | None = "auto") -> Generator:
        """quantize="auto": a quantized GGUF decodes on the int4/int8 path matching each tensor's type (exact for
        Q4_0/Q4_1/Q4_K blocks); other checkpoints in float. "none" / None, or an explicit dtype with "auto":
        full precision. 8 or 4: quantize the float weights with DECODE_PRESETS."""
        mode = decode_quantize(quantize, dtype_given=dtype is not None)
        dtype = torch.float32 if dtype is None else dtype
        if mode == "auto":
            ck = load_checkpoint(name_or_path, dtype=as_dtype(dtype), device=device, quantized=True)
            model, tok = ck.model, ck.tokenizer
        else:
            model, tok = load(name_or_path, dtype=dtype, device=device)
        if isinstance(mode, int):
            model = quantize_model(model, **DECODE_PRESETS[mode])
        return cls(model, tok, str(name_or_path))

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

    def _streamer(self, gc: GenerationConfig) -> TextStreamer:
        return TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)

    def stream(self, prompt: str, *, chat: bool = False, add_special_tokens: bool | None = None,
               truncate: bool = False, **gen) -> Iterator[str]:
        """Yield text pieces as they are decoded (never half a character; stop strings are cut)."""
        gc = GenerationConfig(**gen)
        gc.validate()
        text = self.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode([text], special, gc.max_new_tokens, truncate)
        streamer = self._streamer(gc)
        stop = set(_stop_ids(self.model, gc))
        for tok, done in stream_tokens(self.model, ids, mask, gc):
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
                 truncate: bool = False, **gen) -> str | list[str]:
        """Complete one prompt (-> str) or a batch (-> list[str], left-padded together)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        gc = GenerationConfig(**gen)
        gc.validate()
        texts = [self.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode(texts, special, gc.max_new_tokens, truncate)
        stop = set(_stop_ids(self.model, gc))
        outs = []
        for row in generate(self.model, ids, mask, gc):
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
