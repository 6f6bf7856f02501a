"""Weight-only int8 / int4 quantization for fast batch-1 decoding on CPU.

Decoding one token reads every weight once, so at batch 1 the speed is set by bytes of weights read
per token: SmolLM2-135M's matmuls read 513 MiB in float32, 129 MiB in int8, 103 MiB with int4 blocks and
an int8 head. `quantize_model` swaps the nn.Linear layers of the blocks (and, unless skipped, the LM
head, tied or not) for `QuantLinear`.

Kernels (measured on this torch build, see docs/quantization.md):
- int8, per output channel: `torch._weight_int8pack_mm`. Its float32 path is scalar (10x slower than
  a float32 GEMV); its bfloat16 path is vectorized. So small-M calls run it in bfloat16 (activations and
  outputs rounded to bfloat16, ~0.3% relative error) and cast back.
- int4, per group of 32..256 along K, asymmetric (scale and minimum per group, llama.cpp's Q4_1 grid):
  `torch._weight_int4pack_mm_for_cpu`, again in bfloat16. The kernel's packed layout (a permutation of
  the nibbles) replaces the stored nibbles in memory, so the integers are held once; the state dict still
  gives plain nibbles (`QuantLinear.nibbles`), and every row count runs the kernel.
- On CPUs where torch's kernels are its AVX2 ones (no AVX-512), lmforge's own kernels replace both
  (`lmforge.cpu_kernels`, C++ compiled once per machine): up to 32 rows, int8 activation blocks and integer
  dot products, as llama.cpp does there (~0.5% relative output error on random data, the bf16 kernels' ~0.3%);
  above, an exact chunked dequantize + float32 GEMM. They read the stored nibbles/int8 rows directly (no
  packed copy).
- Anything else (large M for int8 = prefill and perplexity, grouped int8, gradients, shapes the kernels
  refuse): dequantize to the activation dtype, then one dense matmul. Exact up to the weight rounding.
`kernel_mode(...)` forces one path (for tests and accuracy checks).

Tied LM head: the embedding lookup keeps its float table (it reads only T rows per step) while the
quantized copy of the matrix is set with `Transformer.set_lm_head` (it lives at `model.quant_head`), and
`Transformer.lm_logits` uses it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import cpu_kernels
from lmforge.errors import ConfigError
from lmforge.io import atomic_write
from lmforge.model.heads import IGNORE, lm_head_loss

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu")
_INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 CPU kernel accepts
HEAD_NAME = "lm_head"  # the name `skip` uses for the LM head, tied or not
# What `--quantize 8|4` (Generator.load, the CLI, benchmarks) applies: the head is ~20% of a small model's
# weights, so it is quantized too; an int4 head costs SmolLM2 +6% perplexity, so 4-bit keeps an int8 head.
DECODE_PRESETS: dict[int, dict] = {8: {"bits": 8, "skip": ()}, 4: {"bits": 4, "skip": (), "head_bits": 8}}


QUANTIZE_CHOICES = ("auto", "none", "8", "4")  # what --quantize / Generator.load(quantize=...) accept


def decode_quantize(quantize: int | str | None, dtype_given: bool = False) -> int | str:
    """Normalise a quantize setting to "auto", "none", 8 or 4. "auto" (the CLI/Generator default): a GGUF with
    quantized matrices decodes on the matching int4/int8 path, anything else in float; an explicit dtype turns
    "auto" into "none" (`--dtype float32` asks for full precision). None means "none" (the old API default)."""
    q = "none" if quantize is None else str(quantize).lower()
    if q not in QUANTIZE_CHOICES:
        raise QuantError(f"quantize: {quantize!r} is not one of {' | '.join(QUANTIZE_CHOICES)}")
    if q == "auto" and dtype_given:
        return "none"
    return int(q) if q.isdigit() else q


def decode_plan(quantize: int | str | None, dtype: torch.dtype | str | None,
                device: torch.device) -> tuple[int | str, torch.dtype | str]:
    """(quantize mode, weight dtype) that Generator.load uses on `device`, and that `lmforge info` reports.
    The int4/int8 kernels are CPU code, so on a GPU "auto" means the dequantized weights, in bfloat16 where the
    GPU has it (lmforge.device.inference_dtype); on the CPU the float weights load in float32."""
    from lmforge.device import inference_dtype

    mode = decode_quantize(quantize, dtype_given=dtype is not None)
    if mode == "auto" and device.type != "cpu":
        mode = "none"
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else inference_dtype(device)
    return mode, dtype


class QuantError(ConfigError):
    """Unsupported quantization settings (bits, group size) or a layer shape they do not fit."""


# ---- kernel policy ------------------------------------------------------------------------------------
@dataclass
class KernelPolicy:
    """Which matmul QuantLinear runs. "auto": the packed kernel while rows (M = batch x tokens) <= max_m,
    else dequantize + dense matmul; "kernel" / "dequant" force one path where it can run."""

    mode: str = "auto"
    max_m_int8: int = 32  # above this a float32 GEMM on the dequantized weight is faster (prefill)
    max_m_int4: int = 256  # the int4 kernel is a tiled GEMM: as fast as float32 up to ~512 rows
    max_m_own: int = 32  # lmforge's AVX2 kernels: above this their chunked dequantize + float32 GEMM wins


POLICY = KernelPolicy()


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Temporarily force "kernel", "dequant" or "auto" for every QuantLinear (e.g. to measure accuracy)."""
    if mode not in ("auto", "kernel", "dequant"):
        raise QuantError(f"kernel mode {mode!r} is not one of auto | kernel | dequant")
    old, POLICY.mode = POLICY.mode, mode
    try:
        yield
    finally:
        POLICY.mode = old


# ---- quantizers (float weight -> integers + scales) -------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: w (N, K) -> q int8 (N, K) in [-127, 127], scales float32 (N, G); w ~ q * scale."""
    N, K = w.shape
    g = K if group_size is None else group_size
    wg = w.detach().float().reshape(N, K // g, g)  # (N, G, g)
    scales = (wg.abs().amax(-1) / 127.0).clamp(min=1e-12)  # (N, G)
    q = torch.round(wg / scales[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(N, K), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: w (N, K) -> q uint8 (N, K) in [0, 15], scales, mins float32 (N, G);
    w ~ q * scale + min. A weight already on such a grid (llama.cpp Q4_1) comes back exactly."""
    N, K = w.shape
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, lo


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8; low nibble = even column. Our storage format (portable)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def _pack_rows(nibbles: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(nibbles).to(torch.int32).contiguous()  # (N, K)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1)


def _int4pack(nibbles: torch.Tensor) -> torch.Tensor:
    """Our (N, K/2) nibbles -> the CPU int4 kernel's packed layout (N, K/2) uint8 (blocked, CPU-build specific).
    256 rows at a time where the layout allows it: the int32 operand the conversion wants is 8x the nibbles,
    and whole-matrix temporaries of that size left the heap fragmented (peak RSS +150 MB on some loads)."""
    N, step = nibbles.shape[0], 256
    block = _int4pack_row_block()
    if block is None or N <= step or N % block or step % block:
        return _pack_rows(nibbles)
    out = torch.empty_like(nibbles)
    for r in range(0, N, step):
        out[r: r + step] = _pack_rows(nibbles[r: r + step])
    return out


@torch.no_grad()
def _int4unpack(packed: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
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


_ROW_BLOCK: list[int | None] = []  # memo of _int4pack_row_block()


def _int4pack_row_block() -> int | None:
    """Rows per block of the packed layout on this CPU build: packing rows [a; b] gives [pack(a); pack(b)] when a
    and b have a multiple of it rows, so fused q|k|v and gate|up can share one packed tensor with their parts.
    None if no block size up to 256 behaves so (the parts then keep their own integers)."""
    if not _ROW_BLOCK:
        found = None
        if _HAS_INT4_KERNEL:
            g = torch.Generator().manual_seed(0)
            for b in (16, 32, 64, 128, 256):
                parts = [torch.randint(0, 256, (n, 32), dtype=torch.uint8, generator=g) for n in (b, 2 * b, b)]
                try:
                    if torch.equal(_pack_rows(torch.cat(parts)), torch.cat([_pack_rows(p) for p in parts])):
                        found = b
                        break
                except RuntimeError:
                    break
        _ROW_BLOCK.append(found)
    return _ROW_BLOCK[0]


# ---- the layer ----------------------------------------------------------------------------------------
def _kernel_operands(bits: int, group_size: int | None, qweight: torch.Tensor, scales: torch.Tensor,
                     mins: torch.Tensor | None, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed kernel's operands for these integers, or None where the kernel cannot run them (not on CPU,
    a shape or build it refuses). int8: (qweight, bf16 scales); int4: (packed layout, bf16 scales+zeros).
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


def kernel_backend() -> str:
    """Which kernels the quantized layers run on this machine (what `lmforge info` prints)."""
    if cpu_kernels.available():
        return "lmforge AVX2 kernels (int8 activation blocks, integer dot products)"
    cap = torch.backends.cpu.get_cpu_capability()
    return f"torch packed int4/int8 kernels, bf16 activations (CPU capability {cap}; {cpu_kernels.failure()})"


def _own_operands(bits: int, group_size: int | None, qweight: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None) -> tuple | None:
    """Operands of lmforge's AVX2 kernels (the caller checked they are in use): the layer's own tensors (no copy
    where they are float32 and contiguous already), or None where those kernels do not take this layer."""
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
        return qweight.contiguous(), (scales.contiguous(), mins.contiguous())
    return qweight.contiguous(), (scales.float().contiguous(), mins.float().contiguous())


def _own_mm(x: torch.Tensor, bits: int, K: int, N: int, w, s, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (..., K) -> (..., N) through lmforge's AVX2 kernels, or None for a gradient or kernel_mode("dequant").
    Up to POLICY.max_m_own rows run the integer products, more rows the kernels' own chunked dequantize + float
    GEMM (prefill). int4: w, s = lists of the parts' nibbles, (scales list, mins list)."""
    mode = POLICY.mode
    if x.requires_grad or mode == "dequant":
        return None
    # Python ints, also under torch.jit.trace (whose step has static shapes): recorded size arithmetic was ~15
    # graph nodes per call (SmolLM2's traced step: 7,469 nodes with it, 5,669 without)
    rows = math.prod(int(d) for d in x.shape[:-1]) if mode == "kernel" else POLICY.max_m_own  # "kernel": any M
    x2 = x
    if x2.dtype is not torch.float32 or not x2.is_contiguous() or x2.dim() < 2:
        x2 = x2.float().contiguous().reshape(-1, K)
    # (..., K) -> (..., N) inside the op: no reshape and view nodes around each call in a traced step
    y = (torch.ops.lmforge.q4_mm(x2, w, s[0], s[1], rows) if bits == 4
         else torch.ops.lmforge.q8_mm(x2, w, s, rows))
    if x.dtype is not torch.float32:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y if x2 is x else y.view(*x.shape[:-1], N)


def _kernel_mm(x: torch.Tensor, bits: int, K: int, N: int, group_size: int | None, w: torch.Tensor,
               scales: torch.Tensor, bias: torch.Tensor | None, any_rows: bool = False) -> torch.Tensor | None:
    """x (..., K) -> (..., N) through the packed kernel, or None when POLICY sends these rows (or a gradient,
    or a dtype the kernel lacks) to the dequantize path. any_rows: ignore POLICY's row limit (the integers
    exist only in the kernel's layout, so dequantizing would first have to unpack them)."""
    if x.requires_grad or not (x.dtype is torch.float32 or x.dtype is torch.bfloat16):
        return None
    mode = POLICY.mode
    M = x.numel() // K
    if not ((mode != "dequant" and (any_rows or M <= (POLICY.max_m_int8 if bits == 8 else POLICY.max_m_int4)))
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
    return y.view(*x.shape[:-1], N)  # (a Size + tuple view costs 4 us more)


class QuantLinear(nn.Module):
    """A bias-optional linear layer with int8 or int4 weights. State (persistent buffers):
    int8: `qweight` int8 (N, K), `scales` (N, G); int4: `qweight` uint8 (N, K/2) nibbles, `scales`,
    `mins` (N, G); G = 1 for per-channel. Kernel layouts are caches rebuilt on load, never saved."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        _check_spec(bits, group_size)
        if bits == 4 and group_size is None:
            group_size = 32
        g = in_features if group_size is None else group_size
        if in_features % g or (bits == 4 and g % 2):
            raise QuantError(f"in_features {in_features} is not a multiple of group_size {g}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.dtype = dtype  # of the float layer it replaced: output and dequantization dtype
        G = in_features // g
        if bits == 8:
            qw = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            qw = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qw)
        if bits == 4:
            self.register_buffer("mins", torch.zeros(out_features, G, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._packed = False  # int4: qweight holds the kernel's packed layout instead of our nibbles
        self._drop_cache()  # kernel operands: plain attributes (not state), built on the first forward
        self.register_load_state_dict_post_hook(_after_load)

    # -- construction
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 8,
                    group_size: int | None = None) -> QuantLinear:
        N, K = weight.shape
        m = cls(K, N, bits, group_size, bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            if bits == 8:
                q, s = quantize_int8(weight, m.group_size)
                m.qweight.copy_(q)
            else:
                q, s, lo = quantize_int4(weight, m.group_size)
                m.qweight.copy_(pack_nibbles(q))
                m.mins.copy_(lo)
            m.scales.copy_(s)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    @classmethod
    def from_int4(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> QuantLinear:
        """From integers already on an int4 grid, w = q * scale + min: q (N, K) values 0..15, scales and mins
        (N, G). A GGUF's Q4_0 / Q4_1 / Q4_K blocks are such a grid, so nothing is rounded twice."""
        N, K = q.shape
        m = cls(K, N, 4, K // scales.shape[1], bias is not None, dtype=dtype, device=q.device)
        with torch.no_grad():
            m.qweight.copy_(pack_nibbles(q))
            m.scales.copy_(scales)
            m.mins.copy_(mins)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, bits, group_size)

    # -- float views
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the integers stand for, (N, K)."""
        dtype = dtype or self.dtype
        N, K = self.out_features, self.in_features
        G = self.scales.shape[1]
        if self.bits == 8:
            q = self.qweight.reshape(N, G, K // G).to(dtype)
            return (q * self.scales[..., None].to(dtype)).reshape(N, K)
        q = unpack_nibbles(self.nibbles()).reshape(N, G, K // G).to(dtype)
        return (q * self.scales[..., None].to(dtype) + self.mins[..., None].to(dtype)).reshape(N, K)

    def nibbles(self) -> torch.Tensor:
        """int4: the integers as our portable (N, K/2) nibbles (unpacked from the kernel's layout if need be);
        int8: qweight."""
        if self._packed:
            return _int4unpack(self.qweight, self.in_features, self.group_size)
        return self.qweight

    def _unpack(self) -> None:
        """Back from the kernel's layout to nibbles (before a move or cast: the layout is this CPU build's)."""
        if self._packed:
            self.qweight, self._packed = self.nibbles(), False

    def _compact_scales(self) -> None:
        """int4 on lmforge's AVX2 kernels: hold scales and mins as float16 where every value is exactly a float16
        (a GGUF's Q4_0 / Q4_1 blocks): the kernel then streams 0.625 instead of 0.75 bytes per weight. Nothing
        changes value; saving, loading and torch's kernels see float32 (`_widen_scales`)."""
        if self.bits != 4 or self.scales.dtype is not torch.float32 or self.mins.dtype is not torch.float32:
            return
        s16, m16 = self.scales.half(), self.mins.half()
        if torch.equal(s16.float(), self.scales) and torch.equal(m16.float(), self.mins):
            self.scales, self.mins = s16, m16
            self._fast = self._k_w = self._k_scales = None  # operands built on the old tensors (not _gen: same values)

    def _widen_scales(self) -> None:
        if self.bits == 4 and self.scales.dtype is torch.float16:
            self.scales, self.mins = self.scales.float(), self.mins.float()
            self._fast = self._k_w = self._k_scales = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed:  # the saved format is always nibbles
            destination[prefix + "qweight"] = self.nibbles()
        if self.bits == 4 and self.scales.dtype is torch.float16:  # ... and float32 scales (exact: see above)
            destination[prefix + "scales"] = self.scales.float()
            destination[prefix + "mins"] = self.mins.float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._widen_scales()  # loaded values are copied into float32 buffers, never rounded to float16
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, for code that reads `.weight` (slow: a full float copy each time)."""
        return self.dequantize()

    def nbytes(self) -> int:
        """Bytes of the quantized state (what a decode step reads)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., N). The kernel path is kept short: ~200 of these calls run per decoded token.
        fast = self._fast
        if fast is None:
            self._prepare_kernel()
            fast = self._fast
        if fast:
            if self._own:
                y = _own_mm(x, self.bits, self.in_features, self.out_features, self._k_w, self._k_scales, self.bias)
            else:
                y = _kernel_mm(x, self.bits, self.in_features, self.out_features, self.group_size, self._k_w,
                               self._k_scales, self.bias, self._packed)
            if y is not None:
                return y
        lead = x.shape[:-1]
        y = self._dequant_mm(x.reshape(-1, self.in_features))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _prepare_kernel(self) -> None:
        """Decide once whether lmforge's or torch's packed kernel can run this layer, build its operands."""
        own = None
        if cpu_kernels.available():  # they read nibbles: a layer packed for torch's kernel is unpacked first
            self._unpack()
            self._compact_scales()
            own = _own_operands(self.bits, self.group_size, self.qweight, self.scales,
                                self.mins if self.bits == 4 else None)
        if own is not None:
            self._fast, self._own = True, True
            self._k_w, self._k_scales = ([own[0]], ([own[1][0]], [own[1][1]])) if self.bits == 4 else own
            return
        self._widen_scales()
        if self.bits == 8 and self.qweight.device.type == "cpu" and (
                self.qweight.data_ptr() % 64 or not self.qweight.is_contiguous()):
            # the int8 kernel segfaults on unaligned operands (e.g. tensors assigned straight from a
            # safetensors file): give it a fresh, 64-byte-aligned allocation
            self.qweight = self.qweight.contiguous().clone()
        ops = _kernel_operands(self.bits, self.group_size, self.qweight, self.scales,
                               self.mins if self.bits == 4 else None, self._packed)
        self._fast = ops is not None
        self._k_w, self._k_scales = ops if ops is not None else (None, None)
        if ops is not None and self.bits == 4 and not self._packed:  # hold the integers once, in that layout
            self.qweight, self._packed = ops[0], True

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 and self.scales.shape[1] == 1:  # per-channel: scale the N outputs, not N*K weights
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales.reshape(-1).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def _drop_cache(self) -> None:
        """Forget the kernel operands (after load_state_dict, .to(), ...): rebuilt on the next forward."""
        self._fast: bool | None = None
        self._own = False  # lmforge's AVX2 kernels (else torch's)
        self._k_w = self._k_scales = None  # int8: qweight, bf16 scales; int4: packed layout, bf16 scales+zeros
        self._gen = getattr(self, "_gen", 0) + 1  # tells a FusedQuantLinear over this layer to rebuild

    def _apply(self, fn, recurse=True):
        self._unpack()
        self._widen_scales()
        self._drop_cache()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits}, {g}, "
                f"bias={self.bias is not None}")


class FusedQuantLinear(nn.Module):
    """int4 QuantLinear layers that read the same input (q|k|v, gate|up), run as one kernel call per step:
    3 and 2 calls become 1, which saves their per-call overhead, and the kernel is faster on the wider N.

    Inference only, and stateless: the parts stay where they are (their owner's state dict does not change),
    and the concatenated packed operands are a cache, rebuilt when a part's integers change. Rows the kernel
    does not take (prefill above POLICY.max_m_int4, gradients) run each part's dequantize path, so the parts
    never build packed copies of their own."""

    def __init__(self, parts: Sequence[QuantLinear]) -> None:
        super().__init__()
        if not self.fusable(parts):
            raise QuantError("FusedQuantLinear: the parts must be int4 QuantLinear layers of one input width, "
                             "group size and dtype")
        self.parts = tuple(parts)  # a plain tuple: not submodules, so not in the state dict twice
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self._key: tuple | None = None
        self._fast = self._own = False
        self._w = self._sz = self._bias = None

    @staticmethod
    def fusable(parts: Sequence[nn.Module]) -> bool:
        p0 = parts[0]
        return len(parts) > 1 and all(
            isinstance(p, QuantLinear) and p.bits == 4 and p.in_features == p0.in_features
            and p.group_size == p0.group_size and p.dtype == p0.dtype
            and (p.bias is None) == (p0.bias is None) for p in parts)

    def serves(self, *parts: nn.Module) -> bool:
        """Whether this fuses exactly these modules (a part replaced since, e.g. by LoRA, turns it off)."""
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(parts, self.parts))

    def _prepare(self, key: tuple) -> None:
        ps = self.parts
        own = []
        if cpu_kernels.available():
            for p in ps:
                p._unpack()
            for p in ps:
                p._compact_scales()
            if any(p.scales.dtype is not torch.float16 for p in ps):  # one scale type for the kernel's list
                for p in ps:
                    p._widen_scales()
            own = [_own_operands(4, p.group_size, p.qweight, p.scales, p.mins) for p in ps]
        if own and all(o is not None for o in own):  # lmforge's kernel takes the parts as a list: nothing is copied
            self._fast = self._own = True
            self._w = [o[0] for o in own]
            self._sz = ([o[1][0] for o in own], [o[1][1] for o in own])
            self._bias = None if ps[0].bias is None else torch.cat([p.bias for p in ps])
            self._key = key
            return
        self._own = False
        for p in ps:
            p._widen_scales()
        with torch.no_grad():
            ops = _kernel_operands(4, ps[0].group_size, torch.cat([p.nibbles() for p in ps]),
                                   torch.cat([p.scales for p in ps]), torch.cat([p.mins for p in ps]))
            self._bias = None if ps[0].bias is None else torch.cat([p.bias for p in ps])
        self._fast = ops is not None
        self._w, self._sz = ops if ops is not None else (None, None)
        self._key = key
        block = _int4pack_row_block() if ops is not None else None
        if block and all(p.out_features % block == 0 for p in ps):
            # the packed rows of each part are its own packed layout: the parts keep views, not copies
            r = 0
            for p in ps:
                p.qweight, p._packed = self._w[r: r + p.out_features], True
                p._fast, p._k_w, p._k_scales = None, None, None  # (not _drop_cache: the integers did not change)
                r += p.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., sum of the parts' N), the parts' outputs side by side
        key = tuple(p._gen for p in self.parts)
        if key != self._key:
            self._prepare(key)
        if self._own:
            y = _own_mm(x, 4, self.in_features, self.out_features, self._w, self._sz, self._bias)
            if y is not None:
                return y
        elif self._fast:
            y = _kernel_mm(x, 4, self.in_features, self.out_features, self.parts[0].group_size, self._w,
                           self._sz, self._bias, any_rows=True)
            if y is not None:
                return y
        x2 = x.reshape(-1, self.in_features)
        ys = [p._dequant_mm(x2) if p.bias is None else p._dequant_mm(x2) + p.bias.to(x2.dtype) for p in self.parts]
        return torch.cat(ys, -1).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._key = None  # moved or cast: rebuild from the parts
        self._w = self._sz = self._bias = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"fuses {len(self.parts)} int4 layers: in={self.in_features}, out={self.out_features}"


def fuse_projections(model: nn.Module) -> int:
    """Give each attention whose q, k, v are int4 QuantLinear a fused `qkv`, and each gated MLP a fused `gate_up`
    (FusedQuantLinear: one kernel call instead of 3 and 2 per decoded token). Returns how many were fused."""
    n = 0
    for m in model.modules():
        if hasattr(m, "qkv") and all(hasattr(m, a) for a in ("q", "k", "v")):
            parts = (m.q, m.k, m.v)
            m.qkv = FusedQuantLinear(parts) if FusedQuantLinear.fusable(parts) else None
            n += m.qkv is not None
        if hasattr(m, "gate_up") and all(hasattr(m, a) for a in ("gate", "up")):
            parts = (m.gate, m.up)
            m.gate_up = FusedQuantLinear(parts) if FusedQuantLinear.fusable(parts) else None
            n += m.gate_up is not None
    return n


def _after_load(module: QuantLinear, incompatible_keys) -> None:
    module._packed = False  # loaded (copied or assigned) nibbles
    module._drop_cache()  # new integers: the packed kernel copy must be rebuilt


def prepare_kernels(model: nn.Module) -> None:
    """Build every kernel layout now (fused layers first, so their parts share the fused integers), rather than
    in the first forward, and hand the temporaries back to the OS: a loaded model then holds its integers once
    and the first token allocates nothing large."""
    from lmforge.io import release_free_memory

    served: set[int] = set()
    for m in model.modules():
        if isinstance(m, FusedQuantLinear):
            key = tuple(p._gen for p in m.parts)
            if key != m._key:
                m._prepare(key)
                # the freed nibbles and packing temporaries are not reused by the next layer's allocations:
                # trimming per layer keeps SmolLM2's load peak at 360 MB instead of 384
                release_free_memory()
            served.update(id(p) for p in m.parts)
    for m in model.modules():
        if isinstance(m, QuantLinear) and id(m) not in served and m._fast is None:
            m._prepare_kernel()
            release_free_memory()


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows (one scale per token): a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, dim, dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        w = emb.weight
        m = cls(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        q, s = quantize_int8(w)
        with torch.no_grad():
            m.qweight.copy_(q)
            m.scales.copy_(s)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (...) -> (..., D)
        return F.embedding(ids, self.qweight).to(self.dtype) * F.embedding(ids, self.scales).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.to(self.dtype) * self.scales.to(self.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


# ---- whole models ---------------------------------------------------------------------------------------
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


def _check_spec(bits: int, group_size: int | None) -> None:
    if bits not in (4, 8):
        raise QuantError(f"bits must be 8 or 4, got {bits}")
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise QuantError(f"group_size must be an even number >= 2 (or None), got {group_size}")


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
    `model.quant_head` (~20% of SmolLM2's weights, so it matters for speed). quantize_embedding=True also
    replaces the token embedding table by int8 rows (saves memory; lookups read few rows either way).
    bits=4 defaults to groups of 32 (llama.cpp's Q4_1 grid); bits=8 defaults to per-output-channel.
    head_bits / head_group_size: a different format for the LM head. For SmolLM2, int4 blocks are exact
    (its GGUF blocks are Q4_1) but an int4 head costs +6% perplexity, an int8 head +0.1%: use head_bits=8.
    """
    _check_spec(bits, group_size)
    if bits == 4 and group_size is None:
        group_size = 32
    if head_bits is None:
        head_bits, head_group_size = bits, (group_size if head_group_size is None else head_group_size)
    _check_spec(head_bits, head_group_size)
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


# ---- save / load ---------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """One safetensors file: the state dict (integers, scales, float norms/embeddings), the ModelConfig
    and the QuantSpec in its metadata."""
    from safetensors.torch import save_file

    spec = getattr(model, "quant_spec", None)
    if spec is None:
        raise QuantError("save_quantized: the model was not quantized (no quant_spec)")
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # safetensors refuses shared storage (a head sharing the embedding)
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tied = getattr(model, "lm_head", None) is None
    meta = {"lmforge_quant": json.dumps(asdict(spec)), "lmforge_config": json.dumps(model.cfg.to_dict()),
            "tied": str(tied)}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, lambda f: save_file(state, str(f), metadata=meta))


def load_quantized(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a Transformer saved by save_quantized: structure on the meta device, then assign tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lmforge.config import ModelConfig

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, Exception) as e:  # safetensors raises its own error type on bad headers
        raise QuantError(f"{p}: not a readable safetensors file ({e})") from None
    if "lmforge_quant" not in meta or "lmforge_config" not in meta:
        raise QuantError(f"{p}: not written by save_quantized (no lmforge_quant metadata)")
    spec = QuantSpec(**json.loads(meta["lmforge_quant"]))
    cfg = ModelConfig.from_dict(json.loads(meta["lmforge_config"]))
    state = load_file(str(p), device=device)
    return build_quantized(cfg, state, spec, device)


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
    prepare_kernels(model)
    return model.eval()


# ---- quality --------------------------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: torch.Tensor | Sequence[int], block: int = 512,
               batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping blocks of `block` tokens, each scored
    from its own start (so the number depends on `block`; compare models at the same block)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise QuantError("perplexity needs at least 2 tokens")
    block = min(block, getattr(getattr(model, "cfg", None), "context_length", block))
    dev = next(model.parameters(), next(model.buffers())).device
    n_blocks = math.ceil(ids.numel() / block)
    chunks = [ids[i * block:(i + 1) * block] for i in range(n_blocks)]
    if chunks[-1].numel() < 2:
        chunks.pop()
    total, count = 0.0, 0
    for s in range(0, len(chunks), batch_size):
        group = chunks[s:s + batch_size]
        L = max(c.numel() for c in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.long)
        for b, c in enumerate(group):  # right padding: causal attention never looks at it
            x[b, : c.numel()] = c
            mask[b, : c.numel()] = 1
        h = model(x.to(dev))[:, :-1]  # (B, L-1, D)
        tgt = x[:, 1:].to(dev).masked_fill(mask[:, 1:].to(dev) == 0, IGNORE)  # (B, L-1): the next tokens
        total += lm_head_loss(model, h, tgt, reduction="sum").double().item()
        count += int((tgt != IGNORE).sum())
    return math.exp(total / count)
