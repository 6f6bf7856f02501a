"""Whole models: swap a Transformer's float layers for quantized ones (quantize_model), rebuild that structure
from a quantized state dict (build_quantized), and describe it (QuantSpec, quantized_nbytes).

Tied LM head: the embedding lookup keeps its float table (it reads only T rows per step) while the quantized copy
of the matrix is set with `Transformer.set_lm_head` (it lives at `model.quant_head`), and `Transformer.lm_logits`
uses it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from lmforge.quant.embedding import QuantEmbedding
from lmforge.quant.experts import group_experts
from lmforge.quant.layers import QuantLinear, fuse_projections, prepare_kernels
from lmforge.quant.numerics import QuantError, check_spec

HEAD_NAME = "lm_head"  # the name `skip` uses for the LM head, tied or not
# What `--quantize 8|4` (Generator.load, the CLI, benchmarks) applies: the head is a large share of a small model's
# weights, so it is quantized too; an int4 head costs much more perplexity than an int8 one, so 4-bit keeps an int8
# head (docs/quantization.md).
DECODE_PRESETS: Mapping[int, Mapping] = MappingProxyType({  # read-only: no mutable module state
    8: MappingProxyType({"bits": 8, "skip": ()}), 4: MappingProxyType({"bits": 4, "skip": (), "head_bits": 8})})


@dataclass
class QuantSpec:
    """What quantize_model did: enough to rebuild the module structure before loading a saved state."""

    bits: int
    group_size: int | None
    modules: list[str]  # qualified names of the replaced nn.Linear layers
    head: bool  # `quant_head` holds a quantized LM head
    embedding: bool  # embed.tok is a QuantEmbedding
    head_bits: int | None = None  # bits of quant_head (None = `bits`)
    head_group_size: int | None = None
    # per-module [bits, group_size] where a layer differs from (bits, group_size): a GGUF mixes tensor types
    # (Q4_K_M: Q4_K and Q6_K), and each layer takes the path that matches its own type
    layers: dict[str, list] = field(default_factory=dict)
    source: str | None = None  # what the integers came from, e.g. "Q4_1 file" (None: quantized from floats)

    def layer_format(self, name: str) -> tuple[int, int | None]:
        """(bits, group_size) of the replaced layer `name`."""
        bits, group = self.layers.get(name, (self.bits, self.group_size))
        return int(bits), group

    def describe(self) -> str:
        """One phrase for `lmforge info` and logs: "int4 (from Q4_1 file)", "int4+int8 (from Q4_K_M file)"."""
        kinds = sorted({self.layer_format(n)[0] for n in self.modules}, reverse=True)
        if self.head and self.head_bits is not None and not self.modules:
            kinds = [self.head_bits]
        path = "+".join(f"int{b}" for b in sorted(kinds)) or "float32"
        return f"{path} (from {self.source})" if self.source else path


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or name.endswith("." + pat) or name == pat for pat in skip)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None,
                   skip: Sequence[str] = (HEAD_NAME,), quantize_embedding: bool = False,
                   head_bits: int | None = None, head_group_size: int | None = None) -> nn.Module:
    """Replace (in place) every nn.Linear under `blocks` with a QuantLinear; returns the model.

    skip: fnmatch patterns or name suffixes of layers to keep in float ("blocks.0.*", "down"); the name
    "lm_head" stands for the LM head, tied or not: quantizing it (skip=()) stores a quantized copy as
    `model.quant_head` (a large share of a small model's weights, so it matters for speed). quantize_embedding=True
    also replaces the token embedding table by int8 rows (saves memory; lookups read few rows either way).
    bits=4 defaults to groups of 32 (llama.cpp's Q4_1 grid); bits=8 defaults to per-output-channel.
    head_bits / head_group_size: a different format for the LM head; an int4 head costs far more perplexity than
    an int8 one, so int4 blocks usually go with head_bits=8 (docs/quantization.md).
    """
    check_spec(bits, group_size)
    if bits == 4 and group_size is None:
        group_size = 32
    if head_bits is None:
        head_bits, head_group_size = bits, (group_size if head_group_size is None else head_group_size)
    check_spec(head_bits, head_group_size)
    if head_bits == 4 and head_group_size is None:
        head_group_size = 32
    done: list[str] = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or ".blocks." not in f".{name}" or _skipped(name, skip):
            continue
        if mod.in_features % (group_size or 1):
            raise QuantError(f"layer {name!r}: in_features {mod.in_features} is not a multiple of "
                             f"group_size {group_size}")
        _set_module(model, name, QuantLinear.from_linear(mod, bits, group_size))
        done.append(name)
    head = False
    if not _skipped(HEAD_NAME, skip) and hasattr(model, "set_lm_head"):
        lm_head = getattr(model, "lm_head", None)
        w = lm_head.weight if isinstance(lm_head, nn.Linear) else model.embed.tok.weight
        hg = head_group_size
        if w.shape[1] % (hg or 1):
            raise QuantError(f"LM head: d_model {w.shape[1]} is not a multiple of group_size {hg}")
        model.set_lm_head(QuantLinear.from_weight(w, getattr(lm_head, "bias", None), head_bits, hg))
        head = True
    if quantize_embedding:
        if not isinstance(getattr(getattr(model, "embed", None), "tok", None), nn.Embedding):
            raise QuantError("quantize_embedding: the model has no embed.tok nn.Embedding")
        if not head and getattr(model, "lm_head", None) is None:
            raise QuantError("quantize_embedding with a tied, unquantized LM head would put int8 weights "
                             "in the float head matmul: quantize the head too (drop 'lm_head' from skip)")
        model.embed.tok = QuantEmbedding.from_embedding(model.embed.tok)
    model.quant_spec = QuantSpec(bits, group_size, done, head, quantize_embedding,
                                 head_bits if head else None, head_group_size if head else None)
    fuse_projections(model)
    group_experts(model)
    prepare_kernels(model)
    return model


def quantized_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes a batch-1 decode step reads: quantized layers vs remaining float matmul weights."""
    q = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    f = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".blocks." in f".{n}")
    if getattr(model, "quant_head", None) is None and hasattr(model, "lm_logits"):
        lm_head = getattr(model, "lm_head", None)
        w = lm_head.weight if isinstance(lm_head, nn.Linear) else model.embed.tok.weight
        f += w.numel() * w.element_size()
    return {"quantized": q, "float": f}


def build_quantized(cfg, state: dict[str, torch.Tensor], spec: QuantSpec, device: str | torch.device = "cpu"
                    ) -> nn.Module:
    """A Transformer whose layers named by `spec` are QuantLinear, built on the meta device and then given the
    tensors of `state` (a quantized state dict: integers, scales, float norms...), so nothing is copied.
    `state` is consumed (emptied)."""
    from lmforge.model.transformer import Transformer

    # float dtype of the model (norms, embeddings); scales and mins are always float32
    fdtype = next((t.dtype for k, t in state.items() if t.is_floating_point()
                   and not k.endswith((".scales", ".mins"))), torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name in spec.modules:
        lin = model.get_submodule(name)
        bits, group = spec.layer_format(name)
        _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, bits, group,
                                             lin.bias is not None, dtype=fdtype, device="meta"))
    if spec.head:
        w = model.lm_head.weight if model.lm_head is not None else model.embed.tok.weight
        hb = spec.bits if spec.head_bits is None else spec.head_bits
        hg = spec.group_size if spec.head_bits is None else spec.head_group_size
        model.set_lm_head(QuantLinear(w.shape[1], w.shape[0], hb, hg, "quant_head.bias" in state,
                                      dtype=fdtype, device="meta"))
    if spec.embedding:
        e = model.embed.tok
        model.embed.tok = QuantEmbedding(e.num_embeddings, e.embedding_dim, dtype=fdtype, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()  # consumed: prepare_kernels replaces the int4 nibbles, which this dict would keep alive
    model.init_buffers(device)  # rotary tables (non-persistent) were built on meta
    model.quant_spec = spec
    fuse_projections(model)
    group_experts(model)
    prepare_kernels(model)
    return model.eval()
