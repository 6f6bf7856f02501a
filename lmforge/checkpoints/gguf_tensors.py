"""GGUF tensors -> torch tensors in Hugging Face layout: the name tables, dequantization, and undoing what
llama.cpp's converter changed (llama's Q/K row order, gemma3's w + 1 norms, gpt2's transposed Conv1D)."""

from __future__ import annotations

import re

import numpy as np
import torch

from lmforge.checkpoints.hf import to_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError

# GGUF tensor name (without the .weight/.bias suffix) -> HF name, per architecture; {i} is the layer.
_COMMON = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
# The writer (gguf_write.py) maps the other way with the same table.
TENSOR_NAMES: dict[str, dict[str, str]] = {
    "llama": {**_COMMON, "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"},
    "gemma3": {
        **_COMMON,
        "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
        "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
        "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
        "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
        "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    },
    "gpt2": {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
        "blk.{i}.attn_norm": "transformer.h.{i}.ln_1",
        "blk.{i}.attn_qkv": "transformer.h.{i}.attn.c_attn",
        "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
        "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
        "blk.{i}.ffn_up": "transformer.h.{i}.mlp.c_fc",
        "blk.{i}.ffn_down": "transformer.h.{i}.mlp.c_proj",
    },
}
_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
_TENSOR_RX = {
    arch: [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<p>weight|bias)$"), h)
           for g, h in names.items()]
    for arch, names in TENSOR_NAMES.items()
}


def hf_name(arch: str, name: str, src: str) -> str:
    """The HF name of GGUF tensor `name` (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)."""
    for rx, hf in _TENSOR_RX[arch]:
        m = rx.match(name)
        if m:
            return hf.format(i=m.groupdict().get("i")) + "." + m["p"]
    raise CheckpointError(f"{src}: GGUF tensor {name!r} is not understood for architecture {arch!r}")


def convert_tensor(t, arch: str, cfg: ModelConfig, dtype: torch.dtype, src: str) -> torch.Tensor:
    """Dequantize one GGUF tensor to a torch tensor in HF layout."""
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first; torch slowest-first
    out = _dequantize(t, shape, src)
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
        out = unpermute_qk(out, cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads)
    if arch == "gemma3" and t.name.endswith("norm.weight"):
        out -= 1.0  # llama.cpp stores Gemma's RMSNorm weight as w + 1; HF (and our norm_offset=1) keep w
    if arch == "gpt2" and t.name.endswith(_GPT2_CONV1D):
        out = out.t().contiguous()  # back to HF's Conv1D layout (in, out)
    return out if dtype == torch.float32 else out.to(dtype)


CHUNK_ROWS = 1024  # dequantize big tensors (the 262k-row Gemma embedding) in slices: temporaries of a few MB


def tensor_rows(t) -> np.ndarray:
    """A tensor's raw data as (rows, bytes or values per row)."""
    return t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)


def dequantize_rows(t, data: np.ndarray, src: str) -> torch.Tensor:
    """gguf's dequantize of some raw rows of `t` -> float32 (rows, K)."""
    from gguf import dequantize

    try:
        a = np.ascontiguousarray(dequantize(data, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{src}: cannot dequantize GGUF tensor {t.name!r} of type {t.tensor_type.name} "
                              f"({msg})") from None
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 data is a read-only view of the file


def _dequantize(t, shape: tuple[int, ...], src: str) -> torch.Tensor:
    """gguf's dequantize into one preallocated float32 tensor of torch shape `shape`."""
    out = torch.empty(shape, dtype=torch.float32)
    data = tensor_rows(t)
    rows = out.view(data.shape[0], -1)  # shares memory with `out`
    for i in range(0, data.shape[0], CHUNK_ROWS):
        rows[i: i + CHUNK_ROWS] = dequantize_rows(t, data[i: i + CHUNK_ROWS], src)
    return out


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, rotary pairs interleaved (x0,y0,x1,y1,..) -> halves (x..,y..).

    The converter views each head's rows as (2, hd/2) and transposes to (hd/2, 2); we view them as (hd/2, 2)
    and transpose back. w: (n_head * hd, D) weight or (n_head * hd,) bias.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def check_complete(cfg: ModelConfig, body: dict[str, torch.Tensor], arch: str, src: str) -> None:
    """Every tensor the config needs is present with its shape; errors name the GGUF tensor."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        own = Transformer(cfg).state_dict()
    missing = [k for k in own if k not in body]
    if missing:
        raise CheckpointError(f"{src}: GGUF file lacks tensor {_gguf_name(cfg, arch, missing[0])!r} needed by "
                              f"its config" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, t in body.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{src}: GGUF tensor {_gguf_name(cfg, arch, k)!r} has shape {tuple(t.shape)} but "
                                  f"the metadata gives {tuple(own[k].shape)}")


def _gguf_name(cfg: ModelConfig, arch: str, ours: str) -> str:
    """The GGUF name of one of our tensor names, for error messages."""
    try:
        (hf,) = to_hf_state_dict(cfg, {ours: torch.empty(0)}).keys()
    except CheckpointError:
        return ours
    for g, h in TENSOR_NAMES[arch].items():
        m = re.match("^" + re.escape(h).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<p>weight|bias)$", hf)
        if m:
            return g.format(i=m.groupdict().get("i")) + "." + m["p"]
    return ours
