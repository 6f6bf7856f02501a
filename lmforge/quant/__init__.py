"""Weight-only int8 / int4 quantization for fast batch-1 decoding on CPU.

Decoding one token reads every weight once, so at batch 1 its speed is set by the bytes of weights read per
token; `quantize_model` swaps a Transformer's block nn.Linear layers (and, unless skipped, its LM head) for
QuantLinear, which holds int8 rows or int4 nibbles and runs packed integer kernels on small row counts.
Modules: numerics (formats, quantizers), policy (which matmul runs, a per-layer value), kernels (operands and
dispatch), layers (the linear modules), embedding, experts (a mixture's decode token in two kernel calls),
convert (whole models), io (save / load). Numbers: docs/quantization.md.
"""

from lmforge.quant.convert import (
    DECODE_PRESETS,
    HEAD_NAME,
    QuantSpec,
    build_quantized,
    quantize_model,
    quantized_nbytes,
)
from lmforge.quant.embedding import QuantEmbedding
from lmforge.quant.experts import GroupedExperts, group_experts
from lmforge.quant.io import load_quantized, save_quantized
from lmforge.quant.kernels import kernel_backend
from lmforge.quant.layers import FusedQuantLinear, QuantLinear, fuse_projections, prepare_kernels
from lmforge.quant.numerics import QuantError, pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles
from lmforge.quant.policy import DEFAULT_POLICY, KernelPolicy, kernel_mode, kernel_policy, set_kernel_policy

__all__ = [
    "DECODE_PRESETS",
    "DEFAULT_POLICY",
    "HEAD_NAME",
    "FusedQuantLinear",
    "GroupedExperts",
    "KernelPolicy",
    "QuantEmbedding",
    "QuantError",
    "QuantLinear",
    "QuantSpec",
    "build_quantized",
    "fuse_projections",
    "group_experts",
    "kernel_backend",
    "kernel_mode",
    "kernel_policy",
    "load_quantized",
    "pack_nibbles",
    "prepare_kernels",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "quantized_nbytes",
    "save_quantized",
    "set_kernel_policy",
    "unpack_nibbles",
]
