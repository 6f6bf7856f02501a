"""Loading and saving checkpoints: one entry point, whatever the format on disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoints.hf import from_hf_state_dict, read_config, read_state_dict, save_hf
from lmforge.checkpoints.registry import BUILTINS, resolve
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError, ModelNotFoundError
from lmforge.io import release_free_memory
from lmforge.model.transformer import Transformer

__all__ = ["Loaded", "load", "load_full", "load_checkpoint", "as_dtype", "build_model", "save_pretrained", "save_hf",
           "BUILTINS", "resolve"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object | None  # lmforge.tokenizer.Tokenizer
    cfg: ModelConfig
    path: Path
    source: str  # builtin:NAME | local | hub:ID
    format: str  # hf | gguf
    file_size: int
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # task-head tensors found (score, qa_outputs)
    quantization: str | None = None

    @property
    def decode_path(self) -> str:
        """How the loaded model's matmuls run: "int4 (from Q4_1 file)", "int4+int8 (...)", or its float dtype."""
        spec = getattr(self.model, "quant_spec", None)
        if spec is not None:
            return spec.describe()
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def build_model(cfg: ModelConfig, body: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer straight from a state dict, without a wasted random init or a second copy."""
    with torch.device("meta"):
        model = Transformer(cfg)
    own = model.state_dict()
    for name in own:  # module order, so the first mismatch reported is the first in the model
        t = body.get(name)
        if t is not None and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but "
                                  f"the config gives {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(body))
    extra = sorted(set(body) - set(own))
    if missing == ["pooler.bias", "pooler.weight"] and not cfg.causal:
        # an encoder saved without its pooler (roberta-base's masked-LM file): transformers starts it untrained too
        logging.getLogger("lmforge").warning("%s: no pooler in the checkpoint; it starts untrained (normal(0, 0.02), "
                                             "seeded), as transformers does", source)
        g = torch.Generator().manual_seed(0)
        body = {**body, "pooler.weight": torch.randn(cfg.d_model, cfg.d_model, generator=g) * 0.02,
                "pooler.bias": torch.zeros(cfg.d_model)}
        missing = []
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks tensor {missing[0]!r} that the config needs"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{source}: checkpoint has tensor {extra[0]!r} that the config does not use")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in body.items()}
    model.load_state_dict(sd, assign=True)
    model.init_buffers(device)
    return model.eval()


def _dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf"))


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", tokenizer: bool = True, quantized: bool = False) -> Loaded:
    """A built-in name, a HF directory, a GGUF file or a hub id -> model (+ tokenizer).

    quantized=True: a GGUF whose block matrices are quantized loads them as QuantLinear integers, tensor by
    tensor (no float copy of them), each on the int4/int8 path matching its type (checkpoints.gguf.decode_bits).
    Float files, HF directories and run dirs load as usual. The default (float) is what parity tests use."""
    path, source = resolve(str(name_or_path))
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    if path.is_file() and (path.suffix == ".gguf" or _is_gguf(path)):
        from lmforge.checkpoints.gguf import read_gguf

        # The tokenizer first: its build's transient (~40 MB of token lists for SmolLM2) is then freed before the
        # weights arrive instead of adding to their peak. A file the tokenizer cannot read is reported by
        # read_gguf (a CheckpointError naming the cause) before the tokenizer's own error.
        tok, tok_error = None, None
        if tokenizer:
            from lmforge.tokenizer import Tokenizer

            try:
                tok = Tokenizer.from_gguf(path)
            except Exception as e:  # noqa: BLE001 -- re-raised below once the weights have been checked
                tok_error = e
            release_free_memory()
        ck = read_gguf(path, dtype=dtype, quantized=quantized)
        if tok_error is not None:
            raise tok_error
        body, ck.body = ck.body, {}  # the model holds the tensors now: no second reference may keep them alive
        if ck.quant_spec is not None:
            from lmforge.quant import build_quantized

            model = build_quantized(ck.cfg, {k: body.pop(k).to(device) for k in list(body)}, ck.quant_spec, device)
        else:
            model = build_model(ck.cfg, body, str(path), dtype, device)
        del body
        release_free_memory()  # the conversion's freed temporaries, back to the OS
        return Loaded(model, tok, ck.cfg, path, source, "gguf", path.stat().st_size,
                      quantization=getattr(ck, "file_type", None))
    if path.is_file():
        raise ModelNotFoundError(f"{path}: not a model directory or a GGUF file")
    cfg = read_config(path)
    body, heads = from_hf_state_dict(cfg, read_state_dict(path), str(path))
    model = build_model(cfg, body, str(path), dtype, device)
    tok = None
    if tokenizer:
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.from_dir_if_present(path)  # none there: a model still; there and broken: an error naming it
    return Loaded(model, tok, cfg, path, source, "hf", _dir_size(path), heads=heads)


def as_dtype(d: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name as users write it (float32, bf16, ...)."""
    if isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ConfigError(f"dtype {d!r} is not one of {sorted(DTYPES)}")
    return DTYPES[d]


def load(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu"):
    """A built-in name, HF directory, GGUF file or hub id -> (model, tokenizer)."""
    ck = load_checkpoint(name_or_path, dtype=as_dtype(dtype), device=device)
    return ck.model, ck.tokenizer


def load_full(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
              quantized: bool = False) -> Loaded:
    """Like load(), with where it came from, its format and size (what `lmforge info` prints)."""
    return load_checkpoint(name_or_path, dtype=as_dtype(dtype), device=device, quantized=quantized)


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def save_pretrained(model: torch.nn.Module, path: str | Path, tokenizer=None, extra_config: dict | None = None) -> Path:
    """Write a HF directory (config.json, model.safetensors, tokenizer files) that transformers loads.

    `model` is a Transformer or a task model holding one as `.backbone` (its head tensors are saved under
    the HF head names: score / classifier / qa_outputs).
    """
    backbone: Transformer = getattr(model, "backbone", model)
    body = {k: v for k, v in backbone.state_dict().items()}
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")} if model is not backbone \
        else {}
    save_hf(Path(path), backbone.cfg, body, heads or None, extra_config=extra_config, tokenizer=tokenizer)
    return Path(path)
