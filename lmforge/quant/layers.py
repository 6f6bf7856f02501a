"""The quantized linear modules: QuantLinear (int8 / int4 weights, a float nn.Linear's replacement),
FusedQuantLinear (int4 layers reading one input, as one kernel call), and the model-wide steps that set up their
kernels (fuse_projections, prepare_kernels). QuantEmbedding (int8 rows) is in lmforge.quant.embedding, a
mixture's grouped experts in lmforge.quant.experts.

A layer's state dict is always the portable format (int8 rows or nibbles, float32 scales); kernel layouts and
operands are caches built on the first forward (or by prepare_kernels) and dropped on load, move or cast. Which
matmul runs is the layer's `policy` (lmforge.quant.policy), passed to the dispatch in lmforge.quant.kernels.

Training through a frozen quantized base (LoRA on it: QLoRA's idea): an input that needs a gradient runs
`_FrozenQuantMatmul`, which saves no float weight and dequantizes the integers again in row blocks for the
backward, so the model's integers are the only copy of its weights while it trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import cpu_kernels
from lmforge.io import release_free_memory
from lmforge.quant.kernels import (
    int4_symmetric,
    int4pack_row_block,
    int4unpack,
    kernel_mm,
    kernel_operands,
    own_mm,
    own_operands,
    own_parts_ready,
)
from lmforge.quant.numerics import QuantError, check_spec, pack_nibbles, quantize_int4, quantize_int8
from lmforge.quant.policy import DEFAULT_POLICY, KernelPolicy


class QuantLinear(nn.Module):
    """A bias-optional linear layer with int8 or int4 weights. State (persistent buffers):
    int8: `qweight` int8 (N, K), `scales` (N, G); int4: `qweight` uint8 (N, K/2) nibbles, `scales`,
    `mins` (N, G); G = 1 for per-channel. Kernel layouts are caches rebuilt on load, never saved."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        check_spec(bits, group_size)
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
        self.policy: KernelPolicy = DEFAULT_POLICY  # which matmul runs (lmforge.quant.policy)
        self.training = False  # an inference layer until a model's .train() says otherwise (see forward)
        self._packed = False  # int4: qweight holds the kernel's packed layout instead of our nibbles
        self._drop_cache()  # kernel operands: plain attributes (not state), built on the first forward
        self.register_load_state_dict_post_hook(_after_load)

    # -- construction
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 8,
                    group_size: int | None = None) -> QuantLinear:
        N, K = weight.shape
        m = cls(K, N, bits, group_size, bias is not None, dtype=weight.dtype, device=weight.device)  # validates
        if bits == 4:
            return cls.from_int4(*quantize_int4(weight, m.group_size), bias, dtype=weight.dtype)
        return m._filled(*quantize_int8(weight, m.group_size), None, bias)

    @classmethod
    def from_int4(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> QuantLinear:
        """From integers already on an int4 grid, w = q * scale + min: q (N, K) values 0..15, scales and mins
        (N, G). A GGUF's Q4_0 / Q4_1 / Q4_K blocks are such a grid, so nothing is rounded twice."""
        N, K = q.shape
        m = cls(K, N, 4, K // scales.shape[1], bias is not None, dtype=dtype, device=q.device)
        return m._filled(pack_nibbles(q), scales, mins, bias)

    def _filled(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                bias: torch.Tensor | None) -> QuantLinear:
        """This layer with its buffers set (qweight in the stored layout: int8 rows or packed nibbles)."""
        with torch.no_grad():
            for name, value in (("qweight", qweight), ("scales", scales), ("mins", mins), ("bias", bias)):
                if value is not None:
                    getattr(self, name).copy_(value)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, bits, group_size)

    # -- float views
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the integers stand for, (N, K)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows start:stop of the float weight, (stop - start, K): what the gradient paths hold at a time."""
        dtype = dtype or self.dtype
        n, K = stop - start, self.in_features
        G = self.scales.shape[1]
        s = self.scales[start:stop, :, None].to(dtype)  # (n, G, 1)
        if self.bits == 8:
            q = self.qweight[start:stop].reshape(n, G, K // G).to(dtype)
            return (q * s).reshape(n, K)
        # each byte -> its (low, high) nibble values through a 256-row table: one gather writes the floats, where
        # masking, shifting, interleaving and converting would pass over the block four times
        b = torch.arange(256, dtype=torch.int32, device=self.qweight.device)
        pairs = torch.stack((b & 0xF, b >> 4), -1).to(dtype)  # (256, 2)
        q = F.embedding(self.nibbles()[start:stop].int(), pairs).reshape(n, G, K // G)  # (n, G, K/G)
        return q.mul_(s).add_(self.mins[start:stop, :, None].to(dtype)).reshape(n, K)  # q * s + min, two roundings

    def nibbles(self) -> torch.Tensor:
        """int4: the integers as our portable (N, K/2) nibbles (unpacked from the kernel's layout if need be);
        int8: qweight."""
        if self._packed:
            return int4unpack(self.qweight, self.in_features, self.group_size)
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
        if (self.training or x.requires_grad) and torch.is_grad_enabled():  # training (LoRA on the frozen base)
            # exact float products through torch alone: the C++ kernels' OpenMP pool, alternating with torch's
            # own in a training step, makes both spin-wait for the cores (10x slower steps on 2 cores)
            return _FrozenQuantMatmul.apply(x, self) if x.requires_grad else self._blocked_mm(x)
        fast = self._fast
        if fast is None:
            self._prepare_kernel()
            fast = self._fast
        if fast:
            if self._own:
                y = own_mm(x, self.bits, self.in_features, self.out_features, self._k_w, self._k_scales, self.bias,
                           self.policy)
            else:
                y = kernel_mm(x, self.bits, self.in_features, self.out_features, self.group_size, self._k_w,
                              self._k_scales, self.bias, self.policy, self._packed)
            if y is not None:
                return y
        lead = x.shape[:-1]
        y = self._dequant_mm(x.reshape(-1, self.in_features))  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def kernel_parts(self) -> tuple | None:
        """(bits, [weight], [scales], [mins] or None for int8) as lmforge's AVX2 kernels run this layer (built
        if need be), or None where they do not (then its forward runs another path)."""
        if self._fast is None:
            self._prepare_kernel()
        if not (self._fast and self._own) or self.bias is not None:
            return None
        if self.bits == 4:
            return 4, self._k_w, self._k_scales[0], self._k_scales[1]
        return 8, [self._k_w], [self._k_scales], None

    def _prepare_kernel(self) -> None:
        """Decide once whether lmforge's or torch's packed kernel can run this layer, build its operands."""
        own = None
        if cpu_kernels.available():  # they read nibbles: a layer packed for torch's kernel is unpacked first
            self._unpack()
            self._compact_scales()
            own = own_operands(self.bits, self.group_size, self.qweight, self.scales,
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
        ops = kernel_operands(self.bits, self.group_size, self.qweight, self.scales,
                               self.mins if self.bits == 4 else None, self._packed)
        self._fast = ops is not None
        self._k_w, self._k_scales = ops if ops is not None else (None, None)
        if ops is not None and self.bits == 4 and not self._packed:  # hold the integers once, in that layout
            self.qweight, self._packed = ops[0], True

    def _dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 and self.scales.shape[1] == 1:  # per-channel: scale the N outputs, not N*K weights
            return F.linear(x, self.qweight.to(x.dtype)) * self.scales.reshape(-1).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    # -- the gradient paths (_FrozenQuantMatmul): exact float products, a block of dequantized rows at a time
    def _row_blocks(self) -> range:
        self._unpack()  # the torch kernel's packed layout would be unpacked whole on every block: once, here
        step = max(16, GRAD_BLOCK_ELEMS // self.in_features)
        return range(0, self.out_features, step)

    def _blocked_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) = x W^T + b, W dequantized a row block at a time (no whole float copy)."""
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        blocks = self._row_blocks()
        if len(blocks) == 1:
            y = x2 @ self.dequantize(x2.dtype).t()  # (M, N)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)  # (M, N)
            for n0 in blocks:
                n1 = min(n0 + blocks.step, self.out_features)
                y[:, n0:n1] = x2 @ self.dequantize_rows(n0, n1, x2.dtype).t()  # (M, n)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _blocked_grad(self, gy: torch.Tensor) -> torch.Tensor:
        """dL/dx (..., K) = gy (..., N) @ W, summed over row blocks of W (dequantized one at a time)."""
        g2 = gy.reshape(-1, self.out_features)  # (M, N)
        blocks = self._row_blocks()
        gx = None
        for n0 in blocks:
            n1 = min(n0 + blocks.step, self.out_features)
            w = self.dequantize_rows(n0, n1, g2.dtype)  # (n, K)
            gx = g2[:, n0:n1] @ w if gx is None else gx.addmm_(g2[:, n0:n1], w)  # (M, K)
        return gx.reshape(*gy.shape[:-1], self.in_features)

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


GRAD_BLOCK_ELEMS = 1 << 21  # weights the gradient paths dequantize at once: 8 MiB of float32 per block


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = x W^T + b through a frozen QuantLinear, differentiable in x only (the base gets no weight gradient).

    It saves the layer, not a dequantized weight (F.linear on `dequantize()` would keep a float copy of every
    layer alive until the backward): the backward dequantizes W again, a row block at a time, for
    dL/dx = dL/dy @ W. Both directions are exact float products of the integers' values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return layer._blocked_mm(x)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        return ctx.layer._blocked_grad(gy).to(ctx.dtype), None


class FusedQuantLinear(nn.Module):
    """int4 QuantLinear layers that read the same input (q|k|v, gate|up), run as one kernel call per step:
    3 and 2 calls become 1, which saves their per-call overhead, and the kernel is faster on the wider N.
    Per-channel int8 layers fuse too where lmforge's AVX2 kernels run them (q8_mm_parts); elsewhere each int8
    part runs its own call (torch's int8 kernel would need a concatenated copy of the weights).

    Inference only, and stateless: the parts stay where they are (their owner's state dict does not change),
    and the concatenated packed operands are a cache, rebuilt when a part's integers change. Rows the kernel
    does not take (prefill above its policy's max_m_int4, gradients) run each part's dequantize path, so the parts
    never build packed copies of their own."""

    def __init__(self, parts: Sequence[QuantLinear]) -> None:
        super().__init__()
        if not self.fusable(parts):
            raise QuantError("FusedQuantLinear: the parts must be int4 QuantLinear layers of one input width, "
                             "group size and dtype")
        self.parts = tuple(parts)  # a plain tuple: not submodules, so not in the state dict twice
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.policy: KernelPolicy = parts[0].policy
        self.training = False  # as QuantLinear's
        self._key: tuple | None = None
        self._fast = self._own = False
        self._w = self._sz = self._bias = None

    @staticmethod
    def fusable(parts: Sequence[nn.Module]) -> bool:
        p0 = parts[0]
        return len(parts) > 1 and isinstance(p0, QuantLinear) and (p0.bits == 4 or p0.group_size is None) and all(
            isinstance(p, QuantLinear) and p.bits == p0.bits and p.in_features == p0.in_features
            and p.group_size == p0.group_size and p.dtype == p0.dtype
            and (p.bias is None) == (p0.bias is None) for p in parts)

    def serves(self, *parts: nn.Module) -> bool:
        """Whether this fuses exactly these modules (a part replaced since, e.g. by LoRA, turns it off)."""
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(parts, self.parts))

    def _prepare(self, key: tuple) -> None:
        ps = self.parts
        if ps[0].bits == 8:
            self._prepare_int8(key)
            return
        own = []
        if cpu_kernels.available():
            for p in ps:
                p._unpack()
            for p in ps:
                p._compact_scales()
            if any(p.scales.dtype is not torch.float16 for p in ps):  # one scale type for the kernel's list
                for p in ps:
                    p._widen_scales()
            sym = all(int4_symmetric(p.scales, p.mins) for p in ps)  # the kernel takes all parts' mins or none
            own = [own_operands(4, p.group_size, p.qweight, p.scales, p.mins, sym) for p in ps]
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
            ops = kernel_operands(4, ps[0].group_size, torch.cat([p.nibbles() for p in ps]),
                                   torch.cat([p.scales for p in ps]), torch.cat([p.mins for p in ps]))
            self._bias = None if ps[0].bias is None else torch.cat([p.bias for p in ps])
        self._fast = ops is not None
        self._w, self._sz = ops if ops is not None else (None, None)
        self._key = key
        block = int4pack_row_block() if ops is not None else None
        if block and all(p.out_features % block == 0 for p in ps):
            # the packed rows of each part are its own packed layout: the parts keep views, not copies
            r = 0
            for p in ps:
                p.qweight, p._packed = self._w[r: r + p.out_features], True
                p._fast, p._k_w, p._k_scales = None, None, None  # (not _drop_cache: the integers did not change)
                r += p.out_features

    def kernel_parts(self) -> tuple | None:
        """As QuantLinear.kernel_parts: the parts' operands side by side."""
        key = tuple(p._gen for p in self.parts)
        if key != self._key:
            self._prepare(key)
        if not self._own or self._bias is not None:
            return None
        return (4, self._w, self._sz[0], self._sz[1]) if self.parts[0].bits == 4 else (8, self._w, self._sz, None)

    def _prepare_int8(self, key: tuple) -> None:
        """int8 parts: one q8_mm_parts call on the parts' own tensors (nothing copied but the biases), or, where
        lmforge's kernels do not run them all, each part's own forward (`_fast` False)."""
        ps = self.parts
        own = [own_operands(8, None, p.qweight, p.scales, None) for p in ps] \
            if cpu_kernels.available() and own_parts_ready() else []
        self._fast = self._own = bool(own) and all(o is not None for o in own)
        self._w = [o[0] for o in own] if self._own else None
        self._sz = [o[1] for o in own] if self._own else None
        self._bias = None if ps[0].bias is None or not self._own else torch.cat([p.bias for p in ps])
        self._key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., sum of the parts' N), the parts' outputs side by side
        if (self.training or x.requires_grad) and torch.is_grad_enabled():  # training: the parts' own paths
            return torch.cat([p(x) for p in self.parts], -1)
        key = tuple(p._gen for p in self.parts)
        if key != self._key:
            self._prepare(key)
        if not self._fast and self.parts[0].bits == 8:  # int8 parts not on lmforge's kernels: one call each
            return torch.cat([p(x) for p in self.parts], -1)
        if self._own:
            y = own_mm(x, self.parts[0].bits, self.in_features, self.out_features, self._w, self._sz, self._bias,
                       self.policy)
            if y is not None:
                return y
        elif self._fast:
            y = kernel_mm(x, 4, self.in_features, self.out_features, self.parts[0].group_size, self._w,
                          self._sz, self._bias, self.policy, any_rows=True)
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
        return f"fuses {len(self.parts)} int{self.parts[0].bits} layers: in={self.in_features}, out={self.out_features}"


def fuse_projections(model: nn.Module) -> int:
    """Give each attention whose q, k, v are int4 (or per-channel int8) QuantLinear a fused `qkv`, and each gated
    MLP a fused `gate_up` (FusedQuantLinear: one kernel call instead of 3 and 2 per decoded token). Returns how
    many were fused."""
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
    served: set[int] = set()
    for m in model.modules():
        if isinstance(m, FusedQuantLinear):
            key = tuple(p._gen for p in m.parts)
            if key != m._key:
                m._prepare(key)
                # the freed nibbles and packing temporaries are not reused by the next layer's allocations:
                # trimming per layer lowers the load's peak
                release_free_memory()
            served.update(id(p) for p in m.parts)
    for m in model.modules():
        if isinstance(m, QuantLinear) and id(m) not in served and m._fast is None:
            m._prepare_kernel()
            release_free_memory()
