"""A decode token's experts in two kernel calls (lmforge.quant.experts) and int4 blocks whose mins are -8 times
their scales (Q4_0): both must give the bits the per-expert / per-layer kernel calls give (which
test_cpu_kernels.py checks against an emulation), so a token's result does not depend on which path ran or on
the other rows of a batch. Skipped where lmforge's AVX2 kernels are not available."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.moe import MoE
from lmforge.quant import (
    GroupedExperts,
    QuantLinear,
    fuse_projections,
    group_experts,
    kernel_mode,
    pack_nibbles,
    quantize_int4,
)


def q4_0_grid(N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nibbles, float16-exact scales and mins = -8 * scales: what a GGUF's Q4_0 blocks load as."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    s = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half().float()
    return q, s, -8.0 * s


@pytest.mark.parametrize("M", [1, 3, 40])  # 40 > int_rows: the dense path
@pytest.mark.parametrize("half", [False, True])
def test_q4_0_mins_derived_from_the_scales_give_the_same_bits(own, M, half):
    q, s, lo = q4_0_grid(70, 320, 0)  # 10 blocks per row: pairs, no unpaired tail; G = 10 (a scalar tail)
    nib = pack_nibbles(q)
    if half:
        s, lo = s.half(), lo.half()
    x = torch.randn(M, 320, generator=torch.Generator().manual_seed(M))
    want = torch.ops.lmforge.q4_mm(x, [nib], [s], [lo], 32)
    got = torch.ops.lmforge.q4_mm(x, [nib], [s], [s.new_empty(0)], 32)
    assert torch.equal(got, want)
    w = (q.float().reshape(70, 10, 32) * s.float()[..., None] + lo.float()[..., None]).reshape(70, 320)
    torch.testing.assert_close(got, x @ w.t(), rtol=0.02, atol=0.02 * float((x @ w.t()).abs().max()))
    with pytest.raises(RuntimeError, match="mins"):  # all parts' mins or none
        torch.ops.lmforge.q4_mm(x, [nib, nib], [s, s], [s.new_empty(0), lo], 32)


def test_a_q4_0_layer_hands_the_kernel_no_mins(own):
    q, s, lo = q4_0_grid(48, 128, 1)
    lin = QuantLinear.from_int4(q, s, lo)
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = lin(x)
    assert lin._own and lin._k_scales[1][0].numel() == 0  # the kernel derives the mins
    assert torch.equal(y, torch.ops.lmforge.q4_mm(x, [pack_nibbles(q)], [s], [lo], 32))
    asym = QuantLinear.from_int4(q, s, lo + s)  # other mins: read as they are
    with torch.no_grad():
        asym(x)
    assert asym._k_scales[1][0].numel() == 48 * 4


@pytest.mark.parametrize("bits", [4, 8])
def test_routed_products_equal_each_part_alone_weighted_and_summed_in_order(own, bits):
    k, N, K = 5, 96, 160
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(k, K, generator=g)
    route = torch.rand(k, generator=g)
    if bits == 4:
        parts = [q4_0_grid(N, K, i) for i in range(k)]
        ops = [(pack_nibbles(q), s.half(), s.half().new_empty(0)) for q, s, _ in parts]
        got = torch.ops.lmforge.q4_mm_route(x, [o[0] for o in ops], [o[1] for o in ops], [o[2] for o in ops], route)
        each = [torch.ops.lmforge.q4_mm(x[p:p + 1], [o[0]], [o[1]], [o[2]], 32) for p, o in enumerate(ops)]
    else:
        ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g) for _ in range(k)]
        ss = [torch.rand(N, generator=g) * 0.01 for _ in range(k)]
        got = torch.ops.lmforge.q8_mm_route(x, ws, ss, route)
        each = [torch.ops.lmforge.q8_mm(x[p:p + 1], ws[p], ss[p], 32) for p in range(k)]
    want = each[0] * route[0]
    for p in range(1, k):
        want = want + each[p] * route[p]
    assert got.shape == (1, N) and torch.equal(got, want)


def tiny_moe(bits: int, seed: int = 0) -> MoE:
    """A mixture of 6 experts (top 3) whose gate, up and down are int4 on a Q4_0 grid or int8 per channel."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, d_ff=96, n_heads=4, n_experts=6, n_experts_active=3, expert_d_ff=96,
                      moe_norm_topk=True)
    moe = MoE(cfg).eval()
    moe.router = QuantLinear.from_weight(moe.router.weight.detach(), bits=8)  # one row's logits in any batch
    for e in moe.experts:
        for name in ("gate", "up", "down"):
            lin = getattr(e, name)
            if bits == 4:
                q, s, _ = quantize_int4(lin.weight.detach(), 32)
                s = s.half().float()
                setattr(e, name, QuantLinear.from_int4(q, s, -8.0 * s))
            else:
                setattr(e, name, QuantLinear.from_weight(lin.weight.detach(), bits=8))
    fuse_projections(moe)
    assert group_experts(moe) == 1 and isinstance(moe.grouped, GroupedExperts)
    return moe


@pytest.mark.parametrize("bits", [4, 8])
def test_a_decode_token_through_grouped_experts_equals_the_loop_and_the_batch(own, bits):
    moe = tiny_moe(bits)
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    moe.grouped.register_forward_hook(lambda m, a, o: calls.append(o is not None))
    with torch.no_grad():
        batch = moe(x)  # (1, 4, 64): index_add_ over the experts' rows
        for t in range(4):
            tok = x[:, t:t + 1]
            got = moe(tok)
            grouped, moe.grouped = moe.grouped, None
            loop = moe(tok)
            moe.grouped = grouped
            assert torch.equal(got, loop) and torch.equal(got, batch[:, t:t + 1])
    assert calls == [True] * 4  # the grouped calls ran (not the loop behind a None)


def test_grouped_experts_step_aside_where_the_loop_must_run(own):
    moe = tiny_moe(4)
    tok = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = moe(tok)
        with kernel_mode(moe, "dequant"):  # the float path: no integer products
            idx, w = moe.route(tok.view(1, 64))
            order = sorted(idx[0].tolist())
            assert moe.grouped(tok.view(1, 64), order, w[0]) is None
            moe(tok)
        moe.experts[order[0]].down = torch.nn.Linear(96, 64)  # a replaced layer (e.g. LoRA): its loop
        assert moe.grouped(tok.view(1, 64), order, w[0]) is None
        assert not torch.equal(moe(tok), want)
