"""GGUF tensors -> torch tensors in Hugging Face layout: the name tables, dequantization, and undoing what
llama.cpp's converter changed (llama's Q/K row order, gemma's w + 1 norms, gpt2's transposed Conv1D).

Expert weights are one 3-D GGUF tensor per layer and kind (`blk.N.ffn_gate_exps`: experts x rows x cols); they are
read as one `Part` per expert, views into the file with no copy, so the float and the integer paths see ordinary
matrices.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.checkpoints.hf import FUSED, hf_prefix, to_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError

# GGUF tensor name (without the .weight/.bias suffix) -> HF name, per lmforge family; {i} is the layer, {e} the
# expert (the GGUF tensor holds every expert). The writer (gguf_write.py) maps the other way with the same table.
_EMBED = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTN = {
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
}
_MLP = {
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_QK_NORM = {"blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
            "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm"}
_PRE_NORMS = {"blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
              "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"}
_SANDWICH = {
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
}
_COMMON = {**_EMBED, "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm", **_ATTN, **_MLP}
_LLAMA = {**_COMMON, **_PRE_NORMS}
_QWEN3 = {**_LLAMA, **_QK_NORM}


def _experts(prefix: str, gate: str, up: str, down: str, router: str) -> dict[str, str]:
    return {"blk.{i}.ffn_gate_inp": f"model.layers.{{i}}.{router}",
            "blk.{i}.ffn_gate_exps": f"model.layers.{{i}}.{prefix}.{{e}}.{gate}",
            "blk.{i}.ffn_up_exps": f"model.layers.{{i}}.{prefix}.{{e}}.{up}",
            "blk.{i}.ffn_down_exps": f"model.layers.{{i}}.{prefix}.{{e}}.{down}"}


TENSOR_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA,
    "mixtral": {**_EMBED, **_ATTN, **_PRE_NORMS,
                **_experts("block_sparse_moe.experts", "w1", "w3", "w2", "block_sparse_moe.gate")},
    "qwen2": _LLAMA,
    "qwen3": _QWEN3,
    "qwen3_moe": {**_EMBED, **_ATTN, **_PRE_NORMS, **_QK_NORM,
                  **_experts("mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate")},
    "olmo2": {**_EMBED, **_ATTN, **_MLP, **_QK_NORM,
              "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
              "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm"},
    "phi3": {**_EMBED, **_PRE_NORMS,  # fused q|k|v and gate|up, as in HF (split by from_hf_state_dict)
             "blk.{i}.attn_qkv": "model.layers.{i}.self_attn.qkv_proj",
             "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
             "blk.{i}.ffn_up": "model.layers.{i}.mlp.gate_up_proj",
             "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj"},
    "gemma2": {**_COMMON, **_SANDWICH},
    "gemma3": {**_COMMON, **_SANDWICH, **_QK_NORM},
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
# tensors the converter derives from the rope config (read into the config by gguf_rope, not weights)
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _pattern(template: str) -> str:
    """A regex for a name template: {i} captured as the layer, {e} any expert."""
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"\d+")


_TENSOR_RX = {fam: [(re.compile(_pattern(g) + r"\.(?P<p>weight|bias)"), h) for g, h in names.items()]
              for fam, names in TENSOR_NAMES.items()}


@dataclass(frozen=True)
class Part:
    """One matrix of a GGUF tensor (all of it, one expert, or some rows): what the converters below read of a
    GGUF tensor. shape in GGUF order (innermost first), data a view of the file's bytes or values."""

    name: str  # the GGUF tensor's name
    tensor_type: Any
    shape: tuple[int, ...]
    data: np.ndarray


def rows_of(p: Part, start: int, stop: int) -> Part:
    """Rows start..stop of a part (a piece of a fused q|k|v or gate|up; quantized blocks run along a row), or
    values start..stop of a 1-D (float) one."""
    if len(p.shape) == 1:
        return Part(p.name, p.tensor_type, (stop - start,), p.data.reshape(-1)[start:stop])
    return Part(p.name, p.tensor_type, (p.shape[0], stop - start), tensor_rows(p)[start:stop])


def hf_parts(family: str, t, n_experts: int, src: str) -> Iterator[tuple[str, Part]]:
    """(HF name, Part) for a GGUF tensor: itself, or one part per expert for `blk.N.ffn_*_exps`."""
    found = next(((m, hf) for rx, hf in _TENSOR_RX[family] if (m := rx.fullmatch(t.name))), None)
    if found is None:
        raise CheckpointError(f"{src}: GGUF tensor {t.name!r} is not understood for family {family!r}")
    m, hf = found
    name = hf + "." + m["p"]
    shape = tuple(int(s) for s in t.shape)
    if "{e}" not in hf:
        yield name.format(i=m.groupdict().get("i")), Part(t.name, t.tensor_type, shape, t.data)
        return
    if len(shape) != 3 or shape[2] != n_experts:
        raise CheckpointError(f"{src}: GGUF tensor {t.name!r} has shape {list(shape)}, expected "
                              f"[cols, rows, {n_experts}] (one matrix per expert)")
    data = t.data.reshape(n_experts, shape[1], -1)  # (E, rows, bytes or values per row)
    for e in range(n_experts):
        yield name.format(i=m["i"], e=e), Part(t.name, t.tensor_type, shape[:2], data[e])


def convert_tensor(t, arch: str, cfg: ModelConfig, dtype: torch.dtype, src: str) -> torch.Tensor:
    """Dequantize one GGUF tensor (or Part) to a torch tensor in HF layout."""
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first; torch slowest-first
    out = _dequantize(t, shape, src)
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
        out = unpermute_qk(out, cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads)
    if arch in ("gemma2", "gemma3") and t.name.endswith("norm.weight"):
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


def check_complete(cfg: ModelConfig, body: dict[str, torch.Tensor], src: str) -> None:
    """Every tensor the config needs is present with its shape; errors name the GGUF tensor."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        own = Transformer(cfg).state_dict()
    missing = [k for k in own if k not in body]
    if missing:
        raise CheckpointError(f"{src}: GGUF file lacks tensor {_gguf_name(cfg, missing[0])!r} needed by "
                              f"its config" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, t in body.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{src}: GGUF tensor {_gguf_name(cfg, k)!r} has shape {tuple(t.shape)} but "
                                  f"the metadata gives {tuple(own[k].shape)}")


def _gguf_name(cfg: ModelConfig, ours: str) -> str:
    """The GGUF name of one of our tensor names, for error messages (an expert's or a fused part's: its tensor)."""
    try:
        hf = next(iter(to_hf_state_dict(cfg, {ours: torch.empty(0)})), None)
    except (CheckpointError, KeyError):
        return ours
    if hf is None:  # one of the modules stacked in a fused HF tensor (phi3's q in qkv_proj): name the fused one
        for fused, parts in FUSED.get(cfg.family, {}).items():
            for part in parts:
                m = re.fullmatch(_pattern(part) + r"\.(?P<p>weight|bias)", ours)
                if m:
                    hf = hf_prefix(cfg.family, True) + fused.format(i=m["i"]) + "." + m["p"]
    for g, h in TENSOR_NAMES[cfg.family].items():
        m = re.fullmatch(_pattern(h) + r"\.(?P<p>weight|bias)", hf or "")
        if m:
            return g.format(i=m.groupdict().get("i")) + "." + m["p"]
    return ours
