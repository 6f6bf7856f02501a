"""The matmuls of the quantized layers: operands and calls of the packed int4/int8 kernels, and the dispatch that
sends a call to one of them or back to the dequantize path (the layer's own, in lmforge.quant.layers).

- int8, per output channel: `torch._weight_int8pack_mm`. Its float32 path is scalar, its bfloat16 path
  vectorized, so small-M calls run it in bfloat16 (activations and outputs rounded to bfloat16) and cast back.
- int4, per group of 32..256 along K: `torch._weight_int4pack_mm_for_cpu`, again in bfloat16. Its packed layout
  (a permutation of the nibbles, specific to the CPU build) replaces the stored nibbles, so the integers are held
  once; `int4unpack` gives the nibbles back exactly.
- Where lmforge.cpu_kernels is in use (AVX2 CPUs), its q4_mm / q8_mm replace both: int8 activation blocks and
  integer dot products up to `max_m_own` rows, an exact chunked dequantize + float32 GEMM above. They read the
  stored nibbles / int8 rows directly (no packed copy).
Each call gets the layer's KernelPolicy (lmforge.quant.policy), which picks the path by rows. Speeds and errors
of each path: docs/quantization.md and docs/benchmarks.md.

Batch invariance: on the integer path each output is one accumulator summed over K in one fixed order, whatever
the tile shape or the number of rows, so a row's result does not depend on the other rows of the call (tested);
the dense path above `max_m_own` is torch's GEMM, whose order depends on M. The server keeps its decode rows
on one path for any batch size with `policy.cover_rows` (docs/serving.md, "Guarantees").
"""

from __future__ import annotations

import functools
import math

import torch

from lmforge import cpu_kernels
from lmforge.quant.numerics import pack_nibbles, unpack_nibbles
from lmforge.quant.policy import KernelPolicy

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu")
_INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 CPU kernel accepts


def kernel_backend() -> str:
    """Which kernels the quantized layers run on this machine (what `lmforge info` prints)."""
    if cpu_kernels.available():
        return "lmforge AVX2 kernels (int8 activation blocks, integer dot products)"
    cap = torch.backends.cpu.get_cpu_capability()
    return f"torch packed int4/int8 kernels, bf16 activations (CPU capability {cap}; {cpu_kernels.failure()})"


# ---- torch's int4 layout ------------------------------------------------------------------------------
def _pack_rows(nibbles: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(nibbles).to(torch.int32).contiguous()  # (N, K)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1)


def _int4pack(nibbles: torch.Tensor) -> torch.Tensor:
    """Our (N, K/2) nibbles -> the CPU int4 kernel's packed layout (N, K/2) uint8 (blocked, CPU-build specific).
    256 rows at a time where the layout allows it: the int32 operand the conversion wants is 8x the nibbles,
    and whole-matrix temporaries of that size leave the heap fragmented (a higher peak RSS on load)."""
    N, step = nibbles.shape[0], 256
    block = int4pack_row_block()
    if block is None or N <= step or N % block or step % block:
        return _pack_rows(nibbles)
    out = torch.empty_like(nibbles)
    for r in range(0, N, step):
        out[r: r + step] = _pack_rows(nibbles[r: r + step])
    return out


@torch.no_grad()
def int4unpack(packed: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """The kernel's packed layout -> our (N, K/2) nibbles, exactly: the kernel itself multiplies slices of the
    identity by the weights with scale 1 and zero 8, so each output is one integer q (0..15, exact in bf16)."""
    N = packed.shape[0]
    sz = torch.empty(K // group_size, N, 2, dtype=torch.bfloat16)
    sz[..., 0], sz[..., 1] = 1.0, 8.0  # w = (q - 8) * 1 + 8 = q
    q = torch.empty(N, K, dtype=torch.uint8)
    eye = torch.eye(K, dtype=torch.bfloat16)
    for k0 in range(0, K, 256):  # (c, K) identity rows -> (c, N) = q[:, k0:k0+c].T; bounded temporaries
        q[:, k0:k0 + 256] = torch._weight_int4pack_mm_for_cpu(eye[k0:k0 + 256], packed, group_size, sz).t()
    return pack_nibbles(q)


@functools.cache  # a fact of this torch build, found once: a memo, not a setting
def int4pack_row_block() -> int | None:
    """Rows per block of the packed layout on this CPU build: packing rows [a; b] gives [pack(a); pack(b)] when a
    and b have a multiple of it rows, so fused q|k|v and gate|up can share one packed tensor with their parts.
    None if no block size up to 256 behaves so (the parts then keep their own integers)."""
    if not _HAS_INT4_KERNEL:
        return None
    g = torch.Generator().manual_seed(0)
    for b in (16, 32, 64, 128, 256):
        parts = [torch.randint(0, 256, (n, 32), dtype=torch.uint8, generator=g) for n in (b, 2 * b, b)]
        try:
            if torch.equal(_pack_rows(torch.cat(parts)), torch.cat([_pack_rows(p) for p in parts])):
                return b
        except RuntimeError:
            return None
    return None


# ---- operands -----------------------------------------------------------------------------------------
def kernel_operands(bits: int, group_size: int | None, qweight: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor | None, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's packed kernel's operands for these integers, or None where it cannot run them (not on CPU, a shape
    or build it refuses). int8: (qweight, bf16 scales); int4: (packed layout, bf16 scales+zeros).
    packed: the int4 qweight is already in the kernel's layout (else our nibbles)."""
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    if qweight.device.type != "cpu":
        return None
    if bits == 8:
        # K % 16: the bfloat16 kernel crashes (not raises) on other K in torch 2.13
        if not (_HAS_INT8_KERNEL and scales.shape[1] == 1 and K % 16 == 0 and qweight.data_ptr() % 64 == 0):
            return None
    elif not (_HAS_INT4_KERNEL and group_size in _INT4_GROUPS and N % 16 == 0):
        return None
    with torch.no_grad():
        if bits == 8:
            ops = (qweight, scales.reshape(-1).to(torch.bfloat16).contiguous())
        else:
            # the kernel dequantizes w = (q - 8) * scale + zero, so zero = min + 8 * scale
            zeros = mins + 8.0 * scales  # (N, G)
            ops = (qweight if packed else _int4pack(qweight),
                   torch.stack((scales.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous())
        try:  # a build or shape the kernel refuses raises here once, not in the decode loop
            probe = torch.zeros(1, K, dtype=torch.bfloat16)
            if bits == 8:
                torch._weight_int8pack_mm(probe, *ops)
            else:
                torch._weight_int4pack_mm_for_cpu(probe, ops[0], group_size, ops[1])
        except RuntimeError:
            return None
    return ops


def int4_symmetric(scales: torch.Tensor, mins: torch.Tensor) -> bool:
    """Whether mins = -8 * scales exactly (a GGUF's Q4_0 blocks, w = (q - 8) * d): then lmforge's int4 kernel
    is handed an empty mins tensor and derives them from the scales (the same bits), so a decode step streams
    0.5625 instead of 0.625 bytes per weight."""
    with torch.no_grad():
        m8 = scales * -8.0  # exact in float16 and float32 (a power of two) while finite
        return bool(torch.isfinite(m8).all()) and torch.equal(m8, mins)


def own_operands(bits: int, group_size: int | None, qweight: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor | None, symmetric: bool = True) -> tuple | None:
    """Operands of lmforge's AVX2 kernels (the caller checked they are in use): the layer's own tensors (no copy
    where they are float32 and contiguous already), or None where those kernels do not take this layer.
    symmetric: give int4 mins that are -8 * scales as an empty tensor (int4_symmetric)."""
    if qweight.device.type != "cpu":
        return None
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    if K % 32:
        return None
    if bits == 8:
        if scales.shape[1] != 1:
            return None
        return qweight.contiguous(), scales.reshape(-1).float().contiguous()
    blocks = (group_size or 0) // 32
    if group_size is None or group_size % 32 or blocks & (blocks - 1):
        return None
    if scales.dtype is torch.float16 and mins.dtype is torch.float16:  # QuantLinear._compact_scales
        s, m = scales.contiguous(), mins.contiguous()
    else:
        s, m = scales.float().contiguous(), mins.float().contiguous()
    return qweight.contiguous(), (s, s.new_empty(0) if symmetric and int4_symmetric(s, m) else m)


@functools.cache  # once per process, after the kernels are loaded
def own_parts_ready() -> bool:
    """Register the shape-only q8_mm_parts (int8 parts in one call) for torch.compile; False where the loaded
    kernels lack the op (then the parts run one call each)."""
    if not hasattr(torch.ops.lmforge, "q8_mm_parts"):
        return False

    @torch.library.register_fake("lmforge::q8_mm_parts")
    def _q8_parts(x, qweights, scales, int_rows):
        return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in qweights))

    return True


# ---- dispatch -----------------------------------------------------------------------------------------
def own_mm(x: torch.Tensor, bits: int, K: int, N: int, w, s, bias: torch.Tensor | None,
           policy: KernelPolicy) -> torch.Tensor | None:
    """x (..., K) -> (..., N) through lmforge's AVX2 kernels, or None for a gradient or the "dequant" mode.
    Up to policy.max_m_own rows run the integer products, more rows the kernels' own chunked dequantize + float
    GEMM (prefill). int4: w, s = lists of the parts' nibbles, (scales list, mins list); int8: one layer's
    (qweight, scales), or lists of the parts' (own_parts_ready registers the list op's shapes first)."""
    mode = policy.mode
    if x.requires_grad or mode == "dequant":
        return None
    # Python ints, also under torch.jit.trace (whose step has static shapes): recorded size arithmetic would add
    # graph nodes to every call of a traced step
    rows = math.prod(int(d) for d in x.shape[:-1]) if mode == "kernel" else policy.max_m_own  # "kernel": any M
    x2 = x
    if x2.dtype is not torch.float32 or not x2.is_contiguous() or x2.dim() < 2:
        x2 = x2.float().contiguous().reshape(-1, K)
    # (..., K) -> (..., N) inside the op: no reshape and view nodes around each call in a traced step
    if bits == 4:
        y = torch.ops.lmforge.q4_mm(x2, w, s[0], s[1], rows)
    elif isinstance(w, list):  # int8 parts side by side (FusedQuantLinear)
        y = torch.ops.lmforge.q8_mm_parts(x2, w, s, rows)
    else:
        y = torch.ops.lmforge.q8_mm(x2, w, s, rows)
    if x.dtype is not torch.float32:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if x2 is x else y.view(*x.shape[:-1], N)


def kernel_mm(x: torch.Tensor, bits: int, K: int, N: int, group_size: int | None, w: torch.Tensor,
              scales: torch.Tensor, bias: torch.Tensor | None, policy: KernelPolicy,
              any_rows: bool = False) -> torch.Tensor | None:
    """x (..., K) -> (..., N) through torch's packed kernel, or None when `policy` sends these rows (or a
    gradient, or a dtype the kernel lacks) to the dequantize path. any_rows: ignore the policy's row limit (the
    integers exist only in the kernel's layout, so dequantizing would first have to unpack them)."""
    if x.requires_grad or not (x.dtype is torch.float32 or x.dtype is torch.bfloat16):
        return None
    mode = policy.mode
    M = x.numel() // K
    if not ((mode != "dequant" and (any_rows or M <= (policy.max_m_int8 if bits == 8 else policy.max_m_int4)))
            or mode == "kernel"):
        return None
    xb = x.reshape(M, K).to(torch.bfloat16)  # the kernels' only vectorized dtype
    if bits == 8:
        if x.dtype is torch.bfloat16:  # `to` was a no-op: x may be an unaligned view, which crashes the kernel.
            xb = xb.clone()  # Always copied (not only when unaligned), so that a traced step copies as well
        y = torch._weight_int8pack_mm(xb, w, scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(xb, w, group_size, scales)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], N)  # (a Size + tuple view is slower)
