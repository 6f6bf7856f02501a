"""GGUF quantized matrices kept as integers (QuantLinear state) instead of dequantized floats.

Q4_0 / Q4_1 / Q4_K become int4 groups of 32 straight from their blocks; other quantized types are requantized
to int8 per output channel; one tensor at a time, with no float copy of the model. An expert tensor becomes one
layer per expert, a fused one (phi3's q|k|v) one per module: quantized blocks run along rows, so both splits are
exact.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.checkpoints.gguf_tensors import (
    CHUNK_ROWS,
    ROPE_TENSORS,
    Part,
    check_complete,
    convert_tensor,
    dequantize_rows,
    hf_parts,
    rows_of,
    tensor_rows,
    unpermute_qk,
)
from lmforge.checkpoints.hf import from_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.quant import QuantSpec, pack_nibbles, quantize_int8

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # blocks that are an asymmetric int4 grid in groups of 32
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def decode_bits(type_name: str) -> int | None:
    """The integer path that matches a ggml tensor type. Q4_0 / Q4_1 / Q4_K: int4 in groups of 32, built from the
    blocks themselves, exact (w = q * scale + min holds each block's d, m, and Q4_K's 6-bit sub-scales).
    Any other quantized type (Q5_*, Q6_K, Q8_0, Q2_K, IQ*...): int8 per output channel, requantized from the
    dequantized tensor (more than 4 bits, and the only int8 layout with a fast CPU kernel). Floats: None."""
    if type_name in FLOAT_TYPES:
        return None
    return 4 if type_name in INT4_TYPES else 8


def pieces(t, cfg: ModelConfig, src: str) -> list[tuple[str | None, Part]]:
    """A GGUF tensor's matrices under our names: one per expert of an expert tensor, one per module stacked in a
    fused one (phi3's q|k|v), else the tensor itself; the name is None for what is not in the body (a tied head)."""
    out: list[tuple[str | None, Part]] = []
    for hf, part in hf_parts(cfg.family, t, cfg.n_experts, src):
        meta = torch.empty(tuple(reversed(part.shape)), device="meta")
        body, _heads = from_hf_state_dict(cfg, {hf: meta}, src)
        if len(body) <= 1:
            out.append((next(iter(body), None), part))
            continue
        start = 0
        for ours, piece in body.items():  # the fused tensor's row blocks, in order
            out.append((ours, rows_of(part, start, start + piece.shape[0])))
            start += piece.shape[0]
    return out


def weight_tensors(reader) -> list:
    """The file's tensors that hold weights (not the rope factors the config was read from)."""
    return [t for t in reader.tensors if t.name not in ROPE_TENSORS]


def _linear_weights(cfg: ModelConfig) -> set[str]:
    """Our names of the nn.Linear weights inside the blocks (what QuantLinear replaces)."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}


def _plan(reader, arch: str, cfg: ModelConfig, src: str) -> tuple[dict[str, int], int | None]:
    """Our module name -> bits for each block matrix stored quantized, and the bits of the LM head's matrix
    (output.weight, or token_embd.weight when tied; None if it is stored in float)."""
    linears = _linear_weights(cfg)
    layers: dict[str, int] = {}
    head_t = None
    for t in weight_tensors(reader):
        if t.name == "output.weight" or (t.name == "token_embd.weight" and head_t is None):
            head_t = t
        bits = decode_bits(t.tensor_type.name)
        for ours, _part in pieces(t, cfg, src) if bits else ():
            if ours in linears:
                layers[ours.removesuffix(".weight")] = bits
    return layers, decode_bits(head_t.tensor_type.name) if head_t is not None else None


def _spec(layers: dict[str, int], head_bits: int | None, source: str) -> QuantSpec:
    """The QuantSpec of a plan: the most common format as (bits, group), the other layers listed."""
    counts = {b: list(layers.values()).count(b) for b in set(layers.values())}
    bits = max(counts, key=lambda b: (counts[b], b))
    group = {4: 32, 8: None}
    return QuantSpec(bits=bits, group_size=group[bits], modules=list(layers), head=bool(head_bits), embedding=False,
                     head_bits=head_bits, head_group_size=group[head_bits] if head_bits else None,
                     layers={m: [b, group[b]] for m, b in layers.items() if b != bits}, source=source)


def planned_spec(reader, arch: str, cfg: ModelConfig, src: str, source: str) -> QuantSpec | None:
    """What `read_quantized` would keep as integers, from the tensor types alone (None: nothing)."""
    layers, head_bits = _plan(reader, arch, cfg, src)
    return _spec(layers, head_bits, source) if layers else None


def read_quantized(reader, arch: str, cfg: ModelConfig, dtype: torch.dtype, src: str, source: str
                   ) -> tuple[dict[str, torch.Tensor], QuantSpec | None]:
    """Our state dict with the quantized block matrices (and LM head) as QuantLinear state, one tensor at a time;
    (float body, None) when no block matrix is quantized."""
    layers, head_bits = _plan(reader, arch, cfg, src)
    if not layers:
        return {}, None
    # a tied int8 head and an int8 embedding table (one scale per row) are the same integers: keep them once,
    # and never hold the float table (Gemma-3's 262k x 640 would be 671 MB of float32)
    shared = head_bits == 8 and cfg.tie_embeddings
    body: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # float shape of each weight kept as integers (for the checks)
    head_t = None
    for t in weight_tensors(reader):
        if t.name == "output.weight" or (t.name == "token_embd.weight" and head_t is None):
            head_t = t
        for ours, part in pieces(t, cfg, src):
            if ours is None:
                continue
            mod = ours.removesuffix(".weight")
            if mod in layers or (shared and ours == "embed.tok.weight"):
                state = _int_state(part, layers.get(mod, 8), arch, cfg, src)
                body.update({f"{mod}.{k}": v for k, v in state.items()})
                shapes[ours] = tuple(int(s) for s in reversed(part.shape))
            else:
                body[ours] = convert_tensor(part, arch, cfg, dtype, src)
        if t is not head_t or shared:  # a separate int8 head is read again below
            reader.release(t)
    check_complete(cfg, {**body, **{k: torch.empty(s, device="meta") for k, s in shapes.items()}}, src)
    if shared:
        body["quant_head.qweight"], body["quant_head.scales"] = body["embed.tok.qweight"], body["embed.tok.scales"]
    elif head_bits:
        dense = body["lm_head.weight"] if "lm_head.weight" in body else body["embed.tok.weight"]
        state = _int_state(head_t, head_bits, arch, cfg, src, dense=dense.float())
        body.update({f"quant_head.{k}": v for k, v in state.items()})
    spec = _spec(layers, head_bits, source)
    spec.embedding = shared
    return body, spec


def _int_state(t, bits: int, arch: str, cfg: ModelConfig, src: str, dense: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """QuantLinear state for one GGUF matrix: int4 straight from its blocks, or int8 per channel from its
    float values (`dense` when already dequantized, else dequantized here, this tensor only)."""
    if bits == 4:
        q, scales, mins = int4_grid(t, src)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):  # rows only: blocks run along K
            n = cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads
            q, scales, mins = (unpermute_qk(x, n) for x in (q, scales, mins))
        return {"qweight": pack_nibbles(q), "scales": scales, "mins": mins}
    if dense is None and t.name == "token_embd.weight":  # dequantized a slice of rows at a time
        rows = tensor_rows(t)
        N = rows.shape[0]

        def chunk(i: int) -> torch.Tensor:
            return dequantize_rows(t, rows[i: i + CHUNK_ROWS], src)
    else:
        w = dense if dense is not None else convert_tensor(t, arch, cfg, torch.float32, src)
        N = w.shape[0]

        def chunk(i: int) -> torch.Tensor:
            return w[i: i + CHUNK_ROWS]
    # written into preallocated results: the chunks' temporaries reuse one region instead of fragmenting the heap
    qweight, scales = None, None
    for i in range(0, N, CHUNK_ROWS):
        q, sc = quantize_int8(chunk(i))
        if qweight is None:
            qweight = torch.empty(N, q.shape[1], dtype=q.dtype)
            scales = torch.empty(N, sc.shape[1], dtype=sc.dtype)
        qweight[i: i + len(q)], scales[i: i + len(q)] = q, sc
    return {"qweight": qweight, "scales": scales}


def int4_grid(t, src: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks -> q (N, K) uint8 in 0..15, scales and mins (N, K/32) float32 with
    w = q * scale + min, computed as gguf's dequantize computes it (so the float weights agree bit for bit).

    Q4_0: 32 weights (d f16, 16 bytes), w = d * (q - 8): scale d, min -8d. Q4_1: (d, m f16, 16 bytes), w = d*q + m.
    In both, byte j holds weight j (low nibble) and weight j + 16 (high nibble). Q4_K: 256 weights (d, dmin f16,
    12 bytes of 6-bit sub-scales sc and sub-mins mn for 8 groups of 32, 128 bytes): w = d*sc * q - dmin*mn; byte
    j of each 32-byte chunk c holds weight j of group 2c (low nibble) and of group 2c + 1 (high nibble)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import Q4_K

    kind = t.tensor_type.name
    K = int(t.shape[0])
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    raw = np.asarray(t.data).reshape(-1, K // block, size)  # (N, blocks per row, bytes per block)
    N, nb = raw.shape[:2]

    def f16(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view(np.float16).astype(np.float32)  # (N, nb, 1)

    def nibbles(qs: np.ndarray) -> np.ndarray:  # (..., n bytes) -> (..., 2n): low nibbles first, then high
        return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)

    if kind == "Q4_0":
        d = f16(raw[..., 0:2])
        scales, mins, q = d, -8.0 * d, nibbles(raw[..., 2:18])
    elif kind == "Q4_1":
        scales, mins, q = f16(raw[..., 0:2]), f16(raw[..., 2:4]), nibbles(raw[..., 4:20])
    elif kind == "Q4_K":
        d, dmin = f16(raw[..., 0:2]), f16(raw[..., 2:4])  # (N, nb, 1)
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(raw[..., 4:16]).reshape(N * nb, 12))  # (N*nb, 8)
        scales = d * sc.reshape(N, nb, 8).astype(np.float32)  # (N, nb, 8)
        mins = -(dmin * mn.reshape(N, nb, 8).astype(np.float32))
        q = nibbles(raw[..., 16:].reshape(N, nb, 4, 32))  # (N, nb, 4, 64): groups 2c, 2c + 1
        return (torch.from_numpy(np.ascontiguousarray(q.reshape(N, K))),
                torch.from_numpy(scales.reshape(N, nb * 8)), torch.from_numpy(mins.reshape(N, nb * 8)))
    else:
        raise CheckpointError(f"{src}: GGUF tensor {t.name!r} of type {kind} is not an int4 grid")
    return (torch.from_numpy(np.ascontiguousarray(q.reshape(N, K))),
            torch.from_numpy(np.ascontiguousarray(scales.reshape(N, nb))),
            torch.from_numpy(np.ascontiguousarray(mins.reshape(N, nb))))
