"""LoRA adapters -> a GGUF LoRA adapter that llama.cpp loads over its base file (`llama-cli -m BASE --lora FILE`,
llama-cpp-python's `Llama(model_path=BASE, lora_path=FILE)`), in the layout llama.cpp's convert_lora_to_gguf.py
writes and src/llama-adapter.cpp reads:

- metadata: general.architecture (the base's; llama.cpp refuses another), general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha. llama.cpp scales each update by alpha / rank, the rank read from
  the tensor shapes, so a layer whose own alpha / rank differs has that factor folded into its B;
- tensors: for each adapted base matrix `blk.N.attn_q.weight`, `blk.N.attn_q.weight.lora_a` (rank, in) and
  `blk.N.attn_q.weight.lora_b` (out, rank) in numpy order (ggml's ne is reversed), the update being B @ A;
- the base file's row order: write_gguf permutes llama's Q and K rows into llama.cpp's interleaved rotary order,
  so B's rows (the output side) are permuted the same way; A (the input side) is not.

Fused base tensors (gpt2's and phi3's attn_qkv, phi3's gate|up) and expert tensors take no per-projection adapter
here: an ExportError (export the merged model instead).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.checkpoints.gguf import TENSOR_NAMES
from lmforge.checkpoints.gguf_write import GGUF_ARCH, ExportError, check_exportable, write_gguf_atomic
from lmforge.checkpoints.hf import hf_module_name
from lmforge.config import ModelConfig
from lmforge.model.lora import LoraLinear, lora_config_of, split_backbone

__all__ = ["LORA_TYPES", "gguf_lora_tensors", "write_gguf_lora"]

LORA_TYPES = ("f32", "f16")  # adapter tensors are small: no quantized types
_FUSED_FAMILIES = ("gpt2", "phi3")  # q|k|v (and phi3's gate|up) are one GGUF tensor


def permute_rows_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Q/K outputs: per head, halves (x.., y..) -> interleaved pairs (x0, y0, x1, y1..):
    the order write_gguf gives the base's rows (checked against it in tests/test_gguf_lora.py)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_name(cfg: ModelConfig, ours: str, source: str) -> str:
    """Backbone-relative module name (blocks.3.attn.q) -> the base tensor's GGUF name (blk.3.attn_q.weight)."""
    m = re.fullmatch(r"blocks\.(\d+)\..+", ours)
    hf = hf_module_name(cfg.family, ours)  # layers.3.self_attn.q_proj
    names = TENSOR_NAMES["llama" if cfg.family == "mistral" else cfg.family]
    for g, h in names.items():
        if m is None or "{e}" in h:
            continue
        full = h.format(i=m.group(1))
        if full == hf or full.endswith("." + hf):
            return g.format(i=m.group(1)) + ".weight"
    raise ExportError(f"{source}: LoRA layer {ours!r} has no GGUF tensor of its own in llama.cpp's "
                      f"{GGUF_ARCH[cfg.family]} (export the merged model instead)")


def gguf_lora_tensors(model: nn.Module, source: str = "model") -> tuple[dict[str, torch.Tensor], float]:
    """(GGUF tensor name -> float32 tensor, alpha) for the model's adapters, in llama.cpp's layout and scale."""
    backbone, _ = split_backbone(model)
    cfg: ModelConfig = backbone.cfg
    if cfg.family not in GGUF_ARCH:
        raise ExportError(f"{source}: family {cfg.family!r} has no llama.cpp architecture")
    check_exportable(cfg, source)
    if cfg.family in _FUSED_FAMILIES or cfg.n_experts:
        raise ExportError(f"{source}: {cfg.family}'s GGUF tensors fuse the projections LoRA adapts one by one; "
                          "export the merged model (--format gguf) instead")
    loras = {n: m for n, m in backbone.named_modules() if isinstance(m, LoraLinear)}
    if not loras:
        raise ExportError(f"{source}: has no LoRA adapters to export (train with --lora)")
    lc = lora_config_of(model)
    first = next(iter(loras.values()))
    alpha = float(lc.alpha) if lc is not None else first.alpha
    out: dict[str, torch.Tensor] = {}
    for name, m in loras.items():
        g = _gguf_name(cfg, name, source)
        a = m.lora_A.detach().to(device="cpu", dtype=torch.float32)  # (r, in)
        b = m.lora_B.detach().to(device="cpu", dtype=torch.float32)  # (out, r)
        b = b * (m.scale / (alpha / m.rank))  # llama.cpp applies alpha / rank: fold in what differs (1 usually)
        if GGUF_ARCH[cfg.family] == "llama" and name.endswith((".attn.q", ".attn.k")):
            b = permute_rows_qk(b, cfg.n_heads if name.endswith(".q") else cfg.n_kv_heads)
        out[g + ".lora_a"] = a.contiguous()
        out[g + ".lora_b"] = b.contiguous()
    return out, alpha


def write_gguf_lora(path: str | Path, model: nn.Module, type: str = "f32", name: str = "lmforge LoRA",
                    source: str = "model", base_model: str | None = None) -> Path:
    """Write the model's LoRA adapters as one GGUF LoRA adapter file (atomically: whole or not at all)."""
    path = Path(path)
    if type not in LORA_TYPES:
        raise ExportError(f"--type {type!r}: a GGUF LoRA adapter is written as {' or '.join(LORA_TYPES)}")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: output directory {path.parent} does not exist")
    tensors, alpha = gguf_lora_tensors(model, source)
    arch = GGUF_ARCH[split_backbone(model)[0].cfg.family]
    dtype = np.float32 if type == "f32" else np.float16

    def fill(w) -> None:
        w.add_string("general.type", "adapter")
        w.add_string("general.name", name)
        if base_model:
            w.add_string("general.base_model.0.name", str(base_model))
            w.add_uint32("general.base_model.count", 1)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", alpha)
        for tname, t in tensors.items():
            w.add_tensor(tname, t.numpy().astype(dtype))

    return write_gguf_atomic(path, arch, fill)
