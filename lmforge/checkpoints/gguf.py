"""GGUF files (llama.cpp) -> our config and state dict, dequantized to float (or kept as integers).

A GGUF file holds metadata (`{arch}.embedding_length`, `tokenizer.ggml.tokens`, ...) and tensors named
`blk.N.attn_q.weight` etc., some quantized. We read it with the `gguf` package, dequantize one tensor at a
time, undo what llama.cpp's converter changed relative to the Hugging Face checkpoint, and then go through
the HF names so `from_hf_state_dict` stays the one place that knows our names:

- llama (Llama, Mistral, Mixtral): the converter permutes the rows of Q and K (interleaved rotary pairs instead
  of HF's halves); the other architectures keep HF's order;
- gemma2 / gemma3: the converter stores every RMSNorm weight as w + 1 (HF stores w and adds 1 at run time);
- experts: one 3-D tensor per layer and kind (`blk.N.ffn_gate_exps`), read as one matrix per expert;
- rope scaling as tensors: llama3's per-frequency factors (`rope_freqs.weight`), Phi-3's longrope factors;
- a missing `output.weight` means the LM head is tied to the token embeddings;
- gpt2: the converter transposes HF's Conv1D weights to (out, in), fused q/k/v included.

What the converter drops cannot come back: Mistral's, Mixtral's and Qwen2's sliding windows (llama.cpp's llama
and qwen2 have none), and qwen3moe's dense layers (which it cannot convert). Every `{arch}.*` key that is not
read is refused with its name (gguf_config.check_keys).

Parts: gguf_config (metadata -> config), gguf_rope (rope tensors -> rope parameters), gguf_tensors (names,
dequantization, converter undo), gguf_quant (quantized matrices kept as QuantLinear integers).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoints.gguf_config import (
    FAMILY_OF_ARCH,
    file_type_name,
    hf_config,
    meta_get,
    meta_opt,
    metadata_of,
    open_gguf,
)
from lmforge.checkpoints.gguf_quant import (
    FLOAT_TYPES,
    INT4_TYPES,
    decode_bits,
    int4_grid,
    planned_spec,
    read_quantized,
    weight_tensors,
)
from lmforge.checkpoints.gguf_tensors import TENSOR_NAMES, check_complete, convert_tensor, hf_parts
from lmforge.checkpoints.hf import from_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.quant import QuantSpec

__all__ = ["FLOAT_TYPES", "GGUF_FAMILIES", "INT4_TYPES", "SUPPORTED_ARCHITECTURES", "TENSOR_NAMES", "GGUFCheckpoint",
           "decode_bits", "decode_path", "int4_grid", "read_gguf"]

SUPPORTED_ARCHITECTURES = tuple(FAMILY_OF_ARCH)  # general.architecture values read here
# lmforge family -> the GGUF architecture its llama.cpp files carry (Mistral and Mixtral convert as llama)
GGUF_FAMILIES = {**{fam: arch for arch, fam in FAMILY_OF_ARCH.items()}, "mistral": "llama", "mixtral": "llama"}


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, in our terms: config, HF config.json equivalent, dequantized tensors."""

    path: Path
    architecture: str  # general.architecture: llama | qwen2 | gemma3 | ... (SUPPORTED_ARCHITECTURES)
    cfg: ModelConfig
    hf_config: dict[str, Any]  # the config.json transformers would use for these weights (cfg.to_hf())
    body: dict[str, torch.Tensor]  # our tensor names (Transformer.state_dict()), dequantized; {} if tensors=False
    metadata: dict[str, Any]  # GGUF key -> plain Python value; long arrays summarised as "<array of N TYPE>"
    file_type: str | None  # quantization preset named by general.file_type: Q4_1, Q4_K_M, F16, ...
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> number of tensors
    n_bytes: int = 0  # file size on disk
    # read_gguf(quantized=True): which layers `body` holds as integers (QuantLinear state: qweight, scales,
    # mins) instead of float weights; None when every tensor was dequantized
    quant_spec: QuantSpec | None = None

    @property
    def quantization(self) -> str | None:
        return self.file_type


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, tensors: bool = True,
              quantized: bool = False) -> GGUFCheckpoint:
    """Read a GGUF file of a SUPPORTED_ARCHITECTURES model; tensors=False reads only the metadata (fast).

    quantized=True keeps the quantized matrices of the blocks (and the LM head) as QuantLinear integers, tensor
    by tensor, with no float copy of them: see `decode_bits` for which type becomes which path. `ck.quant_spec`
    says what was kept (None if nothing was quantized, e.g. an F16 file); with tensors=False, what would be."""
    path = Path(path)
    reader = open_gguf(path)
    src = str(path)
    arch = meta_get(reader, "general.architecture", src)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{src}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = [t.name for t in reader.tensors]
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{src}: GGUF file has no tensor 'token_embd.weight'")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hf = hf_config(reader, arch, src, names, embd_rows=int(embd.shape[1]), dtype=dtype)
    try:
        cfg = ModelConfig.from_hf(hf, source=src)
    except ConfigError as e:
        raise CheckpointError(f"{src}: GGUF metadata gives an unusable config ({e})") from None

    ck = GGUFCheckpoint(
        path=path, architecture=arch, cfg=cfg, hf_config=cfg.to_hf(), body={}, metadata=metadata_of(reader),
        file_type=file_type_name(meta_opt(reader, "general.file_type")),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)), n_bytes=path.stat().st_size,
    )
    source = f"{ck.file_type or 'quantized'} file"
    if quantized and arch != "gpt2":  # gpt2's fused qkv is split after reading: float path
        reader.fields.clear()
        if tensors:
            ck.body, ck.quant_spec = read_quantized(reader, arch, cfg, dtype, src, source)
        else:  # what the tensors would be kept as, from their types
            ck.quant_spec = planned_spec(reader, arch, cfg, src, source)
    if tensors and ck.quant_spec is None:
        reader.fields.clear()  # done with the parsed token/merge lists (large for a 262k vocab)
        hf_tensors = {}
        for t in weight_tensors(reader):  # dequantized one at a time (an expert tensor: one matrix per expert)
            for name, part in hf_parts(cfg.family, t, cfg.n_experts, src):
                hf_tensors[name] = convert_tensor(part, arch, cfg, dtype, src)
            reader.release(t)
        ck.body, _heads = from_hf_state_dict(cfg, hf_tensors, src)
        del hf_tensors
        check_complete(cfg, ck.body, src)
    return ck


def decode_path(path: str | Path) -> str:
    """The path `quantized=True` loading gives this file, from its tensor types only (reads no weights):
    "int4 (from Q4_1 file)", "int4+int8 (from Q4_K_M file)", or "float32"."""
    spec = read_gguf(path, tensors=False, quantized=True).quant_spec
    return "float32" if spec is None else spec.describe()
