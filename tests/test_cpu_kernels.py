"""lmforge's own AVX2 kernels (lmforge/csrc/qmm_avx2.cpp): the integer products equal an emulation of what they
compute (x rounded to int8 per block of 32, times the exact weights), the dense path (many rows) equals float32,
layers hand them their own tensors (no copy), and the policy switch works. Skipped where the CPU lacks AVX2/FMA
or no C++ compiler builds them (the reason is printed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge import cpu_kernels
from lmforge.errors import ConfigError
from lmforge.quant import (
    FusedQuantLinear,
    QuantLinear,
    kernel_mode,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
)


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded as the kernels round it: per block of 32, to int8 steps of max|block| / 127."""
    M, K = x.shape
    xb = x.double().reshape(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xb / torch.where(d > 0, d, 1)) * d).reshape(M, K)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def int4_layer(N: int, K: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, s, lo = quantize_int4(torch.randn(N, K, generator=g), group)
    w = (q.double().reshape(N, K // group, group) * s.double()[..., None] + lo.double()[..., None]).reshape(N, K)
    return pack_nibbles(q), s, lo, w


@pytest.mark.parametrize("M,N,K,group", [(1, 1536, 576, 32), (3, 576, 1536, 32), (5, 98, 128, 64),
                                         (8, 203, 64, 32), (2, 37, 256, 128), (1, 3, 32, 32),
                                         (2, 50, 96, 32), (1, 7, 160, 32),  # odd block counts: a last unpaired block
                                         # several rows (4-row tiles where the build has 32 registers) with
                                         # 4, 4 + 2 and 4 + 2 + 1 blocks of 32 (AVX-512's 4-block steps, then the rest)
                                         (16, 70, 128, 32), (6, 45, 192, 32), (13, 9, 224, 32), (32, 25, 352, 32)])
def test_int4_products_equal_the_emulation(own, M, N, K, group):
    nib, s, lo, w = int4_layer(N, K, group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M * N))
    y = torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], 32)
    assert y.shape == (M, N) and y.dtype is torch.float32
    # float32 accumulation of the exact integer products: an error relative to the sum of |terms| (a few outputs
    # can cancel to near zero, e.g. N = 3, where an error relative to the outputs would be noise)
    xq = int8_blocks(x)
    assert float((y.double() - xq @ w.t()).abs().max() / (xq.abs() @ w.abs().t()).max()) < 1e-6
    assert rel(y, x.double() @ w.t()) < 0.02  # and the int8 rounding of x is a small error


def test_int4_parts_in_one_call_equal_the_concatenation(own):
    parts = [int4_layer(n, 576, 32, seed=n) for n in (576, 193, 191)]  # q|k|v-like, rows not multiples of a tile
    x = torch.randn(2, 576)
    y = torch.ops.lmforge.q4_mm(x, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], 32)
    want = torch.cat([torch.ops.lmforge.q4_mm(x, [p[0]], [p[1]], [p[2]], 32) for p in parts], 1)
    assert torch.equal(y, want)


@pytest.mark.parametrize("M,N,K", [(1, 4099, 576), (4, 1000, 64), (7, 13, 96), (16, 3001, 96)])
def test_int8_products_equal_the_emulation(own, M, N, K):
    q, s = quantize_int8(torch.randn(N, K))
    x = torch.randn(M, K)
    y = torch.ops.lmforge.q8_mm(x, q, s.reshape(-1).contiguous(), 32)
    w = q.double() * s.double()
    assert rel(y, int8_blocks(x) @ w.t()) < 1e-5
    assert rel(y, x.double() @ w.t()) < 0.02


@pytest.mark.parametrize("M", [1, 3, 40])  # decode rows (integer products), 40 > int_rows (the dense path)
def test_int8_parts_in_one_call_equal_the_concatenation(own, M):
    """q|k|v-like int8 parts (rows not multiples of a tile) in one q8_mm_parts call: the same bits as one call
    per part, and the emulation of what the integer path computes."""
    g = torch.Generator().manual_seed(M)
    parts = [quantize_int8(torch.randn(n, 896, generator=g)) for n in (896, 128, 131)]
    qs, ss = [q for q, _ in parts], [s.reshape(-1).contiguous() for _, s in parts]
    x = torch.randn(M, 896, generator=g)
    y = torch.ops.lmforge.q8_mm_parts(x, qs, ss, 32)
    assert torch.equal(y, torch.cat([torch.ops.lmforge.q8_mm(x, q, s, 32) for q, s in zip(qs, ss)], 1))
    w = torch.cat([q.double() * s.double()[:, None] for q, s in zip(qs, ss)])
    assert rel(y, (int8_blocks(x) if M <= 32 else x.double()) @ w.t()) < 1e-5


def test_many_rows_take_the_exact_dense_path(own):
    """Above int_rows (a prefill) the weights are dequantized a chunk at a time and x stays float32."""
    nib, s, lo, w = int4_layer(600, 128, 64)  # 600 rows: three chunks of the dense path
    x = torch.randn(40, 128)
    torch.testing.assert_close(torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], 32), x @ w.float().t(),
                               rtol=1e-5, atol=1e-5)
    q, sc = quantize_int8(torch.randn(300, 64))
    torch.testing.assert_close(torch.ops.lmforge.q8_mm(x[:, :64].contiguous(), q, sc.reshape(-1).contiguous(), 8),
                               x[:, :64] @ (q.float() * sc).t(), rtol=1e-5, atol=1e-5)


def test_bad_operands_raise(own):
    nib, s, lo, _ = int4_layer(8, 64, 32)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.lmforge.q4_mm(torch.randn(1, 32), [nib], [s], [lo], 32)
    with pytest.raises(RuntimeError, match="group size"):  # 3 groups of ~21 columns
        torch.ops.lmforge.q4_mm(torch.randn(1, 64), [nib], [torch.ones(8, 3)], [torch.zeros(8, 3)], 32)


def test_layers_run_them_on_their_own_tensors(own):
    torch.manual_seed(0)
    parts = [QuantLinear.from_weight(torch.randn(n, 64), torch.randn(n), 4, 32) for n in (64, 32, 32)]
    fused = FusedQuantLinear(parts)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        y = fused(x)
        assert fused._own and all(a is p.qweight for a, p in zip(fused._w, parts))  # no fused copy
        one = torch.cat([p(x) for p in parts], -1)
        assert all(p._own and p._k_w[0] is p.qweight for p in parts)
        torch.testing.assert_close(y, one, rtol=0, atol=0)
        with kernel_mode(fused, "dequant"):
            exact = fused(x)
    assert rel(y, exact) < 0.02
    head = QuantLinear.from_weight(torch.randn(100, 64), None, 8)
    with torch.no_grad():
        y8 = head(x)
    assert head._own and head._k_w is head.qweight and rel(y8, x @ head.dequantize().t()) < 0.02


def test_layers_they_do_not_take_fall_back(own):
    """Group size 96 (not 32 * 2^k) and K = 48 (not a multiple of 32): the other paths run, correctly."""
    for K, group in ((192, 96), (48, 48)):
        lin = QuantLinear.from_weight(torch.randn(16, K), None, 4, group)
        x = torch.randn(1, K)
        with torch.no_grad():
            y = lin(x)
        assert not lin._own and rel(y, x @ lin.dequantize().t()) < 0.02


def test_policy(monkeypatch):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "off")
    assert not cpu_kernels.available() and "off" in cpu_kernels.failure()
    lin = QuantLinear.from_weight(torch.randn(32, 64), None, 4, 32)
    with torch.no_grad():
        lin(torch.randn(1, 64))
    assert not lin._own
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "sometimes")
    with pytest.raises(ConfigError, match="LMFORGE_CPU_KERNELS"):
        cpu_kernels.available()


def test_auto_policy_uses_them_on_avx512_but_leaves_amx_to_torch(monkeypatch):
    """auto: the kernels wherever AVX2/FMA/F16C exist (AVX-512 CPUs included), except on AMX CPUs, where torch's
    kernels are the measured default (docs/benchmarks.md)."""
    monkeypatch.setattr(cpu_kernels, "_has_isa", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_has_amx", lambda: "amx_bf16" in cpu_kernels.cpu_flags())  # cached for real
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "auto")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_vnni",
                                                                     "avx512_bf16"}))
    assert cpu_kernels._wanted() is None
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512f", "amx_bf16"}))
    assert "AMX" in cpu_kernels._wanted()
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "on")
    assert cpu_kernels._wanted() is None


def test_vnni_build_only_where_the_cpu_has_it(monkeypatch):
    base = {"avx2", "fma", "f16c", "avx512f"}
    monkeypatch.delenv("LMFORGE_CPU_VNNI", raising=False)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(base | {"avx512_vnni", "avx512vl"}))
    assert "-mavx512vnni" in cpu_kernels._flags.__wrapped__()
    assert "-mavx512bw" not in cpu_kernels._flags.__wrapped__()  # no 512-bit integer ops without AVX512-BW
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(base | {"avx512_vnni", "avx512vl", "avx512bw"}))
    assert {"-mavx512vnni", "-mavx512bw"} <= set(cpu_kernels._flags.__wrapped__())
    monkeypatch.setenv("LMFORGE_CPU_VNNI", "0")  # the two-step path, for comparisons
    assert "-mavx512vnni" not in cpu_kernels._flags.__wrapped__()
    monkeypatch.delenv("LMFORGE_CPU_VNNI")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset(base))
    assert cpu_kernels._flags.__wrapped__() == cpu_kernels._FLAGS


def test_rms_norm_op_equals_torch_and_serves_inference_only(own, monkeypatch):
    from lmforge.model.layers import RMSNorm

    x, w = torch.randn(2, 3, 576), torch.randn(576)
    torch.testing.assert_close(torch.ops.lmforge.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5),
                               rtol=1e-5, atol=1e-5)
    norm = RMSNorm(576, 1e-5)
    calls = []
    real = torch.ops.lmforge.rms_norm
    monkeypatch.setattr(torch.ops.lmforge, "rms_norm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = norm(x)
    assert calls and torch.allclose(y, F.rms_norm(x, (576,), norm.weight, 1e-5), atol=1e-5)
    calls.clear()
    norm(x).sum().backward()  # grad mode (training, or any call outside no_grad): torch's op, which has a backward
    assert not calls and norm.weight.grad is not None


# ---- decode attention ------------------------------------------------------------------------------------
def attention_by_torch(q, k, v, cos, sin, kc, vc, col, mask, H, KV, hd, scale):
    """What Attention.forward computes for one token with a StaticKV, from torch ops: rotary, index_copy_, SDPA."""
    from lmforge.model.layers import apply_rotary

    B = q.shape[0]
    q, k, v = (t.reshape(B, n, 1, hd) for t, n in ((q, H), (k, KV), (v, KV)))
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    kc.index_copy_(2, col, k)
    vc.index_copy_(2, col, v)
    y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale, enable_gqa=H != KV)
    return y.reshape(B, H * hd)


@pytest.mark.parametrize("B,H,KV,hd,L,rot", [(1, 9, 3, 64, 256, 64), (2, 4, 4, 32, 40, 32), (3, 8, 2, 16, 9, 8),
                                             (2, 4, 1, 64, 300, None)])
def test_decode_attention_equals_rotary_cache_write_and_sdpa(own, B, H, KV, hd, L, rot):
    """One op for rotary + the cache write + attention over the allowed columns; rows with different padding,
    partial rotary (rot < hd) and none; the caches it writes equal index_copy_'s."""
    from lmforge.model.layers import Rotary

    g = torch.Generator().manual_seed(B * L)
    kc, vc = torch.randn(B, KV, L, hd, generator=g), torch.randn(B, KV, L, hd, generator=g)
    q, k, v = (torch.randn(B, n * hd, generator=g) for n in (H, KV, KV))
    col = torch.tensor([L - 3])
    cos = sin = None
    if rot is not None:
        cos, sin = Rotary(hd, 10000.0, fraction=rot / hd).cos_sin(torch.full((B, 1), L - 3), torch.float32)
    allowed = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    allowed[..., : L - 2] = True
    allowed[-1, ..., : B] = False  # the last row is left-padded
    mask = torch.zeros(B, 1, 1, L).masked_fill(~allowed, float("-inf"))
    scale = hd ** -0.5
    kc2, vc2 = kc.clone(), vc.clone()
    want = attention_by_torch(q, k, v, cos, sin, kc, vc, col, mask, H, KV, hd, scale)
    got = torch.ops.lmforge.decode_attn(q, k, v, cos, sin, kc2, vc2, col, mask, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc2, kc, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc2, vc)


def test_decode_attention_takes_caches_with_leading_columns_cut(own):
    """Continuous batching cuts the padding columns of the left of its caches (a view, rows and heads strided):
    the op reads and writes that view as it would a contiguous copy."""
    B, H, KV, hd, L, cut = 3, 4, 2, 16, 20, 5
    g = torch.Generator().manual_seed(1)
    full_k, full_v = torch.randn(B, KV, L, hd, generator=g), torch.randn(B, KV, L, hd, generator=g)
    before = full_k.clone()
    kc, vc = full_k[:, :, cut:], full_v[:, :, cut:]  # (B, KV, L - cut, hd), not contiguous
    q, k, v = (torch.randn(B, n * hd, generator=g) for n in (H, KV, KV))
    col = torch.tensor([L - cut - 2])
    mask = torch.zeros(B, L - cut)
    mask[0, :3] = float("-inf")
    mask[:, L - cut - 1:] = float("-inf")
    kc2, vc2 = kc.contiguous(), vc.contiguous()
    want = torch.ops.lmforge.decode_attn(q, k, v, None, None, kc2, vc2, col, mask, 0.25)
    got = torch.ops.lmforge.decode_attn(q, k, v, None, None, kc, vc, col, mask, 0.25)
    assert torch.equal(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert torch.equal(full_k[:, :, :cut], before[:, :, :cut])  # the cut columns are left alone


def test_decode_attention_bad_operands_raise(own):
    kc = vc = torch.zeros(1, 2, 8, 16)
    q, k = torch.zeros(1, 64), torch.zeros(1, 32)
    mask = torch.zeros(1, 1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.lmforge.decode_attn(q, k, k, None, None, kc, vc, torch.tensor([8]), mask, 0.25)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.lmforge.decode_attn(q, k, k, None, None, kc, vc, torch.tensor([0]), torch.zeros(1, 7), 0.25)
    with pytest.raises(RuntimeError, match="hd a multiple of 8"):
        torch.ops.lmforge.decode_attn(q, k, k, None, None, torch.zeros(1, 2, 8, 12), torch.zeros(1, 2, 8, 12),
                                      torch.tensor([0]), mask, 0.25)


# ---- float16 scales where they are exact -------------------------------------------------------------------
def q4_1_layer(N: int, K: int, seed: int = 0) -> QuantLinear:
    """An int4 layer on a grid whose scales and mins are float16 values, as a GGUF's Q4_1 blocks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s = (torch.rand(N, K // 32, generator=g) * 0.1).half().float()
    lo = (-torch.rand(N, K // 32, generator=g)).half().float()
    return QuantLinear.from_int4(q, s, lo)


def test_exact_float16_scales_are_held_as_float16_and_change_nothing(own):
    lin, ref = q4_1_layer(64, 128), q4_1_layer(64, 128)
    x = torch.randn(1, 128)
    nib, s, lo = ref.qweight, ref.scales.clone(), ref.mins.clone()
    with torch.no_grad():
        y = lin(x)
    assert lin._own and lin.scales.dtype is torch.float16 and lin.mins.dtype is torch.float16
    assert torch.equal(y, torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], 32))  # the float32 operands, bit for bit
    assert lin.nbytes() == 64 * 64 + 2 * 64 * 4 * 2  # nibbles + float16 scales and mins
    sd = lin.state_dict()  # the saved format stays float32
    assert sd["scales"].dtype is torch.float32 and torch.equal(sd["scales"], s) and torch.equal(sd["mins"], lo)
    other = QuantLinear.from_weight(torch.randn(64, 128), None, 4, 32)  # scales that are not float16 values
    lin.load_state_dict(other.state_dict())
    assert lin.scales.dtype is torch.float32 and torch.equal(lin.scales, other.scales)  # loaded unrounded
    with torch.no_grad():
        assert torch.equal(lin(x), other(x)) and lin.scales.dtype is torch.float32


def test_fused_parts_share_one_scale_type(own):
    exact, inexact = q4_1_layer(32, 64, 1), QuantLinear.from_weight(torch.randn(32, 64), None, 4, 32)
    fused = FusedQuantLinear([exact, inexact])
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = fused(x)
    assert fused._own and exact.scales.dtype is torch.float32 and inexact.scales.dtype is torch.float32
    with torch.no_grad():
        torch.testing.assert_close(y, torch.cat([exact(x), inexact(x)], -1), rtol=0, atol=0)
    both = FusedQuantLinear([q4_1_layer(32, 64, 2), q4_1_layer(16, 64, 3)])
    with torch.no_grad():
        both(x)
    assert all(p.scales.dtype is torch.float16 for p in both.parts)


def test_silu_mul_equals_torch(own):
    gu = torch.cat([torch.randn(2, 3, 37) * 6, torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0]).expand(2, 3, 5)], -1)
    gu = torch.cat([gu, torch.randn(2, 3, 42)], -1)  # (2, 3, 84): gate 42 (8-wide and a tail), up 42
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(torch.ops.lmforge.silu_mul(gu), F.silu(g) * u, rtol=2e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="even last dimension"):
        torch.ops.lmforge.silu_mul(torch.zeros(2, 5))


def test_products_keep_the_leading_dimensions(own):
    nib, s, lo, w = int4_layer(40, 64, 32)
    x = torch.randn(2, 3, 64)
    y = torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], 32)
    assert y.shape == (2, 3, 40) and torch.equal(y.reshape(6, 40), torch.ops.lmforge.q4_mm(x.reshape(6, 64), [nib],
                                                                                            [s], [lo], 32))
    q, sc = quantize_int8(torch.randn(24, 64))
    assert torch.ops.lmforge.q8_mm(x, q, sc.reshape(-1).contiguous(), 32).shape == (2, 3, 24)


@pytest.mark.parametrize("N,K", [(1536, 576), (576, 1536), (49, 13), (7, 8), (203, 100)])
def test_f32_linear_is_the_product_and_each_row_is_the_same_in_any_call(own, N, K):
    """f32_linear (csrc/linear_avx2.cpp): the float32 product to rounding, and each row bit for bit the same
    alone, in pairs, at any position and with any neighbours (what batch-invariant decoding needs)."""
    g = torch.Generator().manual_seed(N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(9, K, generator=g)
    y = torch.ops.lmforge.f32_linear(x, w)  # (9, N)
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), rtol=0, atol=1e-4 * K ** 0.5)
    for i in range(9):
        assert torch.equal(torch.ops.lmforge.f32_linear(x[i: i + 1], w)[0], y[i])
    assert torch.equal(torch.ops.lmforge.f32_linear(x[3:6], w), y[3:6])
    assert torch.equal(torch.ops.lmforge.f32_linear(torch.cat([torch.randn(4, K), x[5:6]]), w)[-1], y[5])
    assert torch.ops.lmforge.f32_linear(x.view(3, 3, K), w).shape == (3, 3, N)


def test_f32_linear_bad_operands_raise(own):
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.lmforge.f32_linear(torch.randn(2, 15), w)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lmforge.f32_linear(torch.randn(2, 16).double(), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lmforge.f32_linear(torch.randn(2, 8), w.t())
