"""The Python front door: what the README shows."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.checkpoints import Loaded, load_checkpoint
from lmforge.errors import TokenizerError
from lmforge.model.heads import embed as _embed
from lmforge.model.transformer import Transformer


def load(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """A built-in name, HF directory, GGUF file or hub id -> (model, tokenizer)."""
    ck = load_checkpoint(name_or_path, dtype=_dtype(dtype), device=device)
    return ck.model, ck.tokenizer


def load_full(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> Loaded:
    """Like load(), with where it came from, its format and size (what `lmforge info` prints)."""
    return load_checkpoint(name_or_path, dtype=_dtype(dtype), device=device)


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if d not in table:
        from lmforge.errors import ConfigError
        raise ConfigError(f"dtype {d!r} is not one of {sorted(table)}")
    return table[d]


@torch.inference_mode()
def embed_texts(model: Transformer, tokenizer, texts: list[str], batch_size: int = 32,
                normalize: bool = False, max_length: int | None = None) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, D), batched by length so padding stays small."""
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer files: cannot embed text")
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.cfg.d_model)
    dev = next(model.parameters()).device
    for s in range(0, len(texts), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer.encode_batch([texts[i] for i in idx], max_length=max_length)
        tt = enc.get("token_type_ids")
        e = _embed(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                   None if tt is None else tt.to(dev), normalize=normalize)
        out[idx] = e.float().cpu()
    return out


# ---- text generation ---------------------------------------------------------------------------------
class Generator:
    """Text in, text out: tokenization, chat templates, stop strings and streaming around generate.py."""

    def __init__(self, model: Transformer, tokenizer, name: str = "") -> None:
        if tokenizer is None:
            raise TokenizerError(f"{name or 'model'}: no tokenizer found, cannot generate text")
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
             quantize: int | None = None) -> Generator:
        model, tok = load(name_or_path, dtype=dtype, device=device)
        if quantize:
            from lmforge.quant import DECODE_PRESETS, QuantError, quantize_model

            if quantize not in DECODE_PRESETS:
                raise QuantError(f"quantize: {quantize} bits is not supported (choose 8 or 4)")
            model = quantize_model(model, **DECODE_PRESETS[quantize])
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

    def _encode(self, prompts: list[str], add_special_tokens: bool, max_new_tokens: int, truncate: bool):
        from lmforge.errors import GenerationError

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
                import logging

                logging.getLogger("lmforge").warning("prompt %d truncated from %d to its last %d tokens", i,
                                                     len(row), room)
                ids[i] = row[-room:]
        T = max(map(len, ids))
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        dev = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in ids], device=dev)  # left padding
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids], device=dev)
        return input_ids, mask

    def _config(self, **kw):
        from lmforge.generate import GenerationConfig

        return GenerationConfig(**kw)

    def stream(self, prompt: str, *, chat: bool = False, add_special_tokens: bool | None = None,
               truncate: bool = False, **gen):
        """Yield text pieces as they are decoded (never half a character; stop strings are cut)."""
        from lmforge.generate import TextStreamer, stream_tokens

        gc = self._config(**gen)
        gc.validate()
        text = self.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode([text], special, gc.max_new_tokens, truncate)
        streamer = TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)
        stop = set(gc.stop_token_ids if gc.stop_token_ids is not None else self.model.cfg.eos_ids)
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
        from lmforge.generate import TextStreamer, generate

        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        gc = self._config(**gen)
        gc.validate()
        texts = [self.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
        special = (not chat) if add_special_tokens is None else add_special_tokens
        ids, mask = self._encode(texts, special, gc.max_new_tokens, truncate)
        stop = set(gc.stop_token_ids if gc.stop_token_ids is not None else self.model.cfg.eos_ids)
        outs = []
        for row in generate(self.model, ids, mask, gc):
            row = row[:-1] if row and row[-1] in stop else row
            st = TextStreamer(lambda t: self.tokenizer.decode(t, skip_special_tokens=True), gc.stop_strings)
            outs.append("".join(st.put(t) for t in row) + st.end())
        return outs[0] if single else outs

    def chat(self, messages: list[dict[str, str]], **gen) -> str:
        """The assistant's reply to a conversation, through the model's chat template."""
        gen.setdefault("max_new_tokens", 256)
        return self.generate(self.format_chat(messages), add_special_tokens=False, **gen)

    def chat_stream(self, messages: list[dict[str, str]], **gen):
        gen.setdefault("max_new_tokens", 256)
        prompt = self.format_chat(messages)
        yield from self.stream(prompt, add_special_tokens=False, **gen)


# ---- classification ----------------------------------------------------------------------------------
class Classifier:
    """A trained text classifier: `Classifier.train(...)`, `Classifier.load(run_dir)`, `.predict(texts)`."""

    def __init__(self, loaded) -> None:
        self._lc = loaded  # lmforge.tasks.classify.LoadedClassifier

    @property
    def labels(self) -> list[str]:
        return list(self._lc.labels)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> Classifier:
        from lmforge.tasks.classify import load_classifier

        return cls(load_classifier(run_dir, device=device))

    @classmethod
    def train(cls, model: str = "minilm-l6", data: str = "tweets-sentiment", output_dir: str | Path = "runs/classify",
              resume: bool = False, log=None, **kwargs) -> Classifier:
        """Fine-tune and return the trained classifier. kwargs: any ClassifyConfig field (eval_data, max_length,
        lora, ...) or TrainConfig field (epochs, batch_size, lr, eval_every, ...)."""
        import dataclasses

        from lmforge.tasks.classify import ClassifyConfig
        from lmforge.tasks.classify import train as _train
        from lmforge.train import TrainConfig

        cfields = {f.name for f in dataclasses.fields(ClassifyConfig)}
        tfields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(kwargs) - cfields - tfields
        if unknown:
            from lmforge.errors import ConfigError

            raise ConfigError(f"Classifier.train: unknown argument(s) {sorted(unknown)}")
        c = ClassifyConfig(model=model, data=data, **{k: v for k, v in kwargs.items() if k in cfields})
        tkw = {"keep_best": "accuracy", "eval_every": 100, "warmup": 0.1, **{k: v for k, v in kwargs.items()
                                                                            if k in tfields}}
        summary = _train(c, TrainConfig(output_dir=output_dir, **tkw), resume=resume, log=log or (lambda *_: None))
        return cls.load(summary["run_dir"])

    def predict(self, texts: list[str] | str, batch_size: int = 64) -> list[dict]:
        """[{label, score, probabilities}] per text."""
        from lmforge.tasks.classify import predict

        return predict(self._lc, [texts] if isinstance(texts, str) else list(texts), batch_size)

    def evaluate(self, data: str, limit: int | None = None) -> dict:
        """Accuracy, macro-F1, per-class scores and confusion matrix on a built-in dataset's test split or a file."""
        from lmforge.tasks.classify import ClassifyConfig, evaluate, load_eval_examples

        return evaluate(self._lc, load_eval_examples(data, ClassifyConfig(), limit))
