"""Weight-only int8/int4 quantization: layer accuracy on both paths (packed kernel, dequantize), whole-model
logits and decoding on a tiny random llama, save/load round trip, perplexity. Runs in a few seconds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.decoding import greedy
from lmforge.errors import LmforgeError
from lmforge.metrics import perplexity
from lmforge.model.transformer import Transformer
from lmforge.quant import (
    DEFAULT_POLICY,
    FusedQuantLinear,
    KernelPolicy,
    QuantEmbedding,
    QuantError,
    QuantLinear,
    kernel_mode,
    kernel_policy,
    kernels,
    load_quantized,
    pack_nibbles,
    quantize_int4,
    quantize_model,
    quantized_nbytes,
    save_quantized,
    set_kernel_policy,
    unpack_nibbles,
)

VOCAB = 128  # multiples of 16 everywhere, so the int8 and int4 kernels take every layer


@pytest.fixture
def torch_kernels(monkeypatch):
    """Tests of torch's packed kernels: lmforge's own AVX2 kernels (tests/test_cpu_kernels.py) switched off."""
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "off")


def tiny(tie: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, context_length=128, tie_embeddings=tie, eos_token_id=2)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits are not all near zero
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- layer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["kernel", "dequant"])
@pytest.mark.parametrize("bits,group,tol", [(8, None, 1e-2), (8, 32, 1e-2), (4, 32, 0.12), (4, 64, 0.15)])
def test_quant_linear_close_to_float(mode, bits, group, tol):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    q = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(3, 5, 256)
    with torch.no_grad(), kernel_mode(q, mode):
        y = q(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert rel(y, lin(x).detach()) < tol


def test_kernel_and_dequant_paths_agree():
    torch.manual_seed(1)
    for bits in (8, 4):
        q = QuantLinear.from_weight(torch.randn(64, 128), None, bits, 32 if bits == 4 else None)
        x = torch.randn(7, 128)
        with torch.no_grad(), kernel_mode(q, "kernel"):
            yk = q(x)
        with torch.no_grad(), kernel_mode(q, "dequant"):
            yd = q(x)
        assert q._fast is True  # the kernel really ran (this torch build has it)
        assert rel(yk, yd) < 1e-2  # bfloat16 activations on the kernel path
        assert rel(yd, x @ q.dequantize().t()) < 1e-6


def test_int4_is_exact_on_a_q4_1_grid():
    """Weights already on a 16-level grid per group of 32 (what a Q4_1 GGUF dequantizes to) survive."""
    torch.manual_seed(2)
    N, K, g = 32, 64, 32
    q = torch.randint(0, 16, (N, K // g, g))
    q[..., 0], q[..., 1] = 0, 15  # each group spans the full grid, as llama.cpp's quantizer makes it
    w = (q * torch.rand(N, K // g, 1) * 0.01 - torch.rand(N, K // g, 1) * 0.05).reshape(N, K)
    ql = QuantLinear.from_weight(w, None, 4, g)
    torch.testing.assert_close(ql.dequantize(), w, rtol=0, atol=1e-6)
    q2, s, lo = quantize_int4(w, g)
    assert torch.equal(q2.reshape(N, K // g, g), q.to(torch.uint8))


def test_pack_unpack_nibbles():
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    p = pack_nibbles(q)
    assert p.shape == (5, 6) and p.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(p), q)


@pytest.mark.parametrize("bits,N,K", [(8, 24, 40), (4, 24, 64)])
def test_shapes_the_kernels_refuse_fall_back(bits, N, K, torch_kernels):
    """int8 kernel: K % 16 != 0 (it would crash); int4 kernel: N % 16 != 0. Both take the dequant path."""
    torch.manual_seed(3)
    w = torch.randn(N, K)
    ql = QuantLinear.from_weight(w, None, bits, 32 if bits == 4 else None)
    x = torch.randn(2, K)
    with torch.no_grad(), kernel_mode(ql, "kernel"):
        y = ql(x)
    assert ql._fast is False
    assert rel(y, x @ w.t()) < (1e-2 if bits == 8 else 0.15)


def test_unaligned_operands_do_not_crash_the_int8_kernel(torch_kernels):
    """torch 2.13's int8 kernel segfaults on unaligned tensors: weights assigned from a file, bf16 views."""
    torch.manual_seed(5)
    w = torch.randn(64, 128)
    ql = QuantLinear.from_weight(w, None, 8)
    buf = torch.empty(ql.qweight.numel() + 1, dtype=torch.int8)[1:].view_as(ql.qweight)  # offset by 1 byte
    buf.copy_(ql.qweight)
    ql.qweight = buf
    ql._drop_cache()
    x = torch.randn(5 * 128 + 3).bfloat16()[3:].view(5, 128)  # bf16 input at an odd address
    with torch.no_grad(), kernel_mode(ql, "kernel"):
        y = ql(x)
    assert ql._fast is True and rel(y, x.float() @ w.t()) < 2e-2


def test_no_kernel_available(monkeypatch, torch_kernels):
    monkeypatch.setattr(kernels, "_HAS_INT8_KERNEL", False)
    ql = QuantLinear.from_weight(torch.randn(32, 64), None, 8)
    x = torch.randn(1, 64)
    assert rel(ql(x), x @ ql.dequantize().t()) < 1e-6 and ql._fast is False


def test_gradients_flow_through_the_dequant_path():
    """A frozen quantized base under a trainable input (e.g. LoRA): the aten kernels have no backward."""
    ql = QuantLinear.from_weight(torch.randn(32, 64), None, 8)
    x = torch.randn(2, 64, requires_grad=True)
    ql(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_kernel_cache_is_rebuilt_after_load_and_to():
    torch.manual_seed(4)
    a = QuantLinear.from_weight(torch.randn(32, 64), None, 4, 32)
    b = QuantLinear.from_weight(torch.randn(32, 64), None, 4, 32)
    x = torch.randn(1, 64)
    with torch.no_grad():
        a(x)
        assert a._fast is True
        a.load_state_dict(b.state_dict())
        assert a._fast is None  # stale packed weights dropped
        torch.testing.assert_close(a(x), b(x))
        a.to(torch.float32)
        assert a._fast is None
    assert set(a.state_dict()) == {"qweight", "scales", "mins"}  # kernel layouts are never saved


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_projection_equals_its_parts(bits):
    """q|k|v as one kernel call: the same numbers as the three calls, on both paths, with and without bias."""
    torch.manual_seed(5)
    for bias in (False, True):
        parts = [QuantLinear.from_weight(torch.randn(n, 64), torch.randn(n) if bias else None, bits,
                                         32 if bits == 4 else None) for n in (64, 32, 32)]
        fused = FusedQuantLinear(parts)
        for x in (torch.randn(1, 1, 64), torch.randn(2, 300, 64)):  # decode rows (kernel), prefill (dequant)
            with torch.no_grad():
                want = torch.cat([p(x) for p in parts], -1)
                got = fused(x)
            assert got.shape == (*x.shape[:-1], 128)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(fused.state_dict()) == set()  # stateless: the parts keep the tensors
    assert fused.serves(*parts) and not fused.serves(parts[0], parts[2], parts[1])
    # new integers in a part: the fused operands are rebuilt
    other = QuantLinear.from_weight(torch.randn(32, 64), torch.randn(32), bits, 32 if bits == 4 else None)
    x = torch.randn(1, 64)
    with torch.no_grad():
        parts[1].load_state_dict(other.state_dict())
        torch.testing.assert_close(fused(x)[:, 64:96], other(x), rtol=0, atol=0)
    with pytest.raises(QuantError):  # int4 with int8, grouped int8: not fused
        FusedQuantLinear([parts[0], QuantLinear.from_weight(torch.randn(32, 64), None, 12 - bits,
                                                            32 if bits == 8 else None)])
    with pytest.raises(QuantError):
        FusedQuantLinear([QuantLinear.from_weight(torch.randn(32, 64), None, 8, 32)] * 2)


def test_quantized_model_fuses_projections_and_keeps_its_state_dict():
    m = tiny()
    q = quantize_model(copy.deepcopy(m), bits=4, skip=(), head_bits=8)
    keys = set(q.state_dict())
    assert all(b.attn.qkv is not None and b.mlp.gate_up is not None for b in q.blocks)
    assert not any(".qkv." in k or ".gate_up." in k for k in keys)
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        fused_logits = q.logits(ids)
        ref = copy.deepcopy(q)
        for b in ref.blocks:
            b.attn.qkv = b.mlp.gate_up = None
        torch.testing.assert_close(fused_logits, ref.logits(ids), rtol=1e-5, atol=1e-5)
        # a part replaced (as LoRA would): the stale fusion is bypassed, not used
        q.blocks[0].attn.q = QuantLinear.from_weight(torch.zeros(64, 64), None, 4, 32)
        ref.blocks[0].attn.q = q.blocks[0].attn.q
        torch.testing.assert_close(q.logits(ids), ref.logits(ids), rtol=1e-5, atol=1e-5)
    q8 = quantize_model(copy.deepcopy(m), bits=8, skip=())  # per-channel int8 fuses too (one call where
    assert all(b.attn.qkv is not None and b.mlp.gate_up is not None for b in q8.blocks)  # lmforge's kernels run)
    with torch.no_grad():
        fused_logits = q8.logits(ids)
        for b in q8.blocks:
            b.attn.qkv = b.mlp.gate_up = None
        torch.testing.assert_close(fused_logits, q8.logits(ids), rtol=1e-5, atol=1e-5)  # (silu_mul when fused)


needs_int4_kernel = pytest.mark.skipif(not kernels._HAS_INT4_KERNEL, reason="this torch build has no CPU int4 kernel")


@needs_int4_kernel
@pytest.mark.parametrize("N,K,group", [(64, 64, 32), (192, 576, 32), (1536, 576, 32), (576, 1536, 64), (48, 256, 256)])
def test_int4_kernel_layout_unpacks_exactly(N, K, group):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    assert torch.equal(kernels.int4unpack(kernels._int4pack(q), K, group), q)


@needs_int4_kernel
def test_int4_integers_are_held_once_in_the_kernel_layout_and_saved_as_nibbles(torch_kernels):
    m = tiny()
    q = quantize_model(copy.deepcopy(m), bits=4, skip=(), head_bits=8)
    sd = q.state_dict()
    rb = kernels.int4pack_row_block()
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear) and mod.bits == 4:
            want = pack_nibbles(quantize_int4(m.get_submodule(name).weight.detach(), 32)[0])
            parent, leaf = name.rsplit(".", 1)
            fused = {"q": ("q", "k", "v"), "k": ("q", "k", "v"), "v": ("q", "k", "v"),
                     "gate": ("gate", "up"), "up": ("gate", "up")}.get(leaf)
            rows = [q.get_submodule(f"{parent}.{x}").out_features for x in fused or ()]
            # no second copy of the integers next to the packed layout; the parts of a fused layer whose rows
            # are not all a multiple of this CPU build's row block (e.g. 32-row k/v against 64) keep nibbles
            if not fused or (rb and all(r % rb == 0 for r in rows)):
                assert mod._packed, name
            assert torch.equal(sd[f"{name}.qweight"], want)  # the state dict keeps the portable nibbles
    if kernels.int4pack_row_block():  # the parts of a fused layer are views of its packed tensor
        for b in q.blocks:
            fused_ptr = b.mlp.gate_up._w.untyped_storage().data_ptr()
            assert all(p.qweight.untyped_storage().data_ptr() == fused_ptr for p in (b.mlp.gate, b.mlp.up))
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        before = q.logits(ids)
        with kernel_mode(q, "dequant"):  # the exact path unpacks the integers first
            exact = q.logits(ids)
        lin = q.blocks[0].attn.o
        q.to(torch.float32)  # a move or cast goes back to nibbles (the layout is this CPU build's)
        assert not lin._packed and torch.equal(lin.qweight, sd["blocks.0.attn.o.qweight"])
        torch.testing.assert_close(q.logits(ids), before, rtol=0, atol=0)
        with kernel_mode(q, "dequant"):
            torch.testing.assert_close(q.logits(ids), exact, rtol=1e-6, atol=1e-6)
        fresh = quantize_model(copy.deepcopy(m), bits=4, skip=(), head_bits=8)
        fresh.load_state_dict(sd)  # nibbles copied into packed tensors (and fused views): rebuilt from them
        torch.testing.assert_close(fresh.logits(ids), before, rtol=0, atol=0)


def test_a_model_built_on_meta_does_not_import_dynamo():
    """Building the shell that loaded weights are assigned to must not run nn.init on meta tensors, which
    imports torch._dynamo (seconds, and ~70 MB of resident memory)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from lmforge.config import ModelConfig\n"
            "from lmforge.model.transformer import Transformer\n"
            "cfg = ModelConfig(family='llama', vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)\n"
            "with torch.device('meta'):\n"
            "    Transformer(cfg)\n"
            "assert Transformer(cfg).embed.tok.weight.std() > 0.01\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_bad_settings_raise():
    with pytest.raises(QuantError):
        QuantLinear(64, 32, bits=3)
    with pytest.raises(QuantError):
        QuantLinear(60, 32, bits=8, group_size=32)
    with pytest.raises(LmforgeError):
        quantize_model(tiny(), bits=4, group_size=48)  # 64 % 48 != 0
    with pytest.raises(QuantError):
        with kernel_mode(tiny(), "fast"):  # refused even where no layer is quantized
            pass
    with pytest.raises(QuantError):
        quantize_model(tiny(), bits=8, quantize_embedding=True)  # tied head left float: refused


def test_kernel_policy_is_a_value_per_model():
    """kernel_mode changes the given model's layers only, and gives each its own policy back afterwards."""
    a = quantize_model(tiny(), bits=4, skip=(), head_bits=8)
    b = quantize_model(tiny(), bits=4, skip=(), head_bits=8)
    assert kernel_policy(a) is DEFAULT_POLICY and kernel_policy(nn.Linear(2, 2)) == KernelPolicy()
    assert all(f.policy is DEFAULT_POLICY for f in (a.blocks[0].attn.qkv, a.blocks[0].mlp.gate_up, a.quant_head))
    mine = KernelPolicy(max_m_int4=8)
    set_kernel_policy(a, mine)
    assert a.blocks[0].attn.qkv.policy is mine and a.quant_head.policy is mine
    with kernel_mode(a, "dequant"):
        assert {m.policy for m in a.modules() if isinstance(m, (QuantLinear, FusedQuantLinear))} == {
            KernelPolicy("dequant", max_m_int4=8)}
        assert kernel_policy(b) is DEFAULT_POLICY  # another model is untouched
    assert kernel_policy(a) is mine and a.blocks[1].mlp.down.policy is mine
    with pytest.raises(QuantError):
        KernelPolicy(mode="fast")


# ---- whole model -------------------------------------------------------------------------------------------
def test_quantize_model_replaces_block_linears_and_head():
    m = tiny()
    q = quantize_model(copy.deepcopy(m), bits=8, skip=())
    names = [n for n, mod in q.named_modules() if isinstance(mod, QuantLinear)]
    assert len(names) == 2 * 7 + 1 and "quant_head" in names
    assert not any(isinstance(mod, nn.Linear) for mod in q.modules())
    assert q.quant_spec.head and q.quant_spec.bits == 8
    nb = quantized_nbytes(q)
    float_bytes = 4 * sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2)  # blocks + tied table
    assert nb["float"] == 0 and nb["quantized"] < 0.3 * float_bytes
    # default skip keeps the LM head in float; patterns keep chosen layers in float
    d = quantize_model(copy.deepcopy(m), bits=8)
    assert getattr(d, "quant_head", None) is None and quantized_nbytes(d)["float"] > 0
    s = quantize_model(copy.deepcopy(m), bits=8, skip=("lm_head", "blocks.0.*", "down"))
    kept = [n for n, mod in s.named_modules() if isinstance(mod, nn.Linear)]
    layer0 = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
    assert set(kept) == {f"blocks.0.{x}" for x in layer0} | {"blocks.1.mlp.down"}


@pytest.mark.parametrize("bits,tol", [(8, 4e-2), (4, 0.35)])  # gaussian weights: the worst case
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_logits_close_and_greedy_runs(bits, tol, tie):
    m = tiny(tie=tie)
    q = quantize_model(copy.deepcopy(m), bits=bits, skip=())
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        ref = m.logits(ids)
        for mode in ("auto", "kernel", "dequant"):
            with kernel_mode(q, mode):
                assert rel(q.logits(ids), ref) < tol
    out = greedy(q, ids[:1, :6], 10)
    assert out.shape == (1, 16) and torch.equal(out[:, :6], ids[:1, :6])
    # teacher-forced on the float model's own continuation, the int8 next-token choice mostly agrees
    cont = greedy(m, ids[:1, :6], 10)
    with torch.no_grad():
        agree = (q.logits(cont).argmax(-1) == m.logits(cont).argmax(-1)).float().mean()
    assert agree >= (0.9 if bits == 8 else 0.5)


def test_quantized_embedding():
    m = tiny()
    q = quantize_model(copy.deepcopy(m), bits=8, skip=(), quantize_embedding=True)
    assert isinstance(q.embed.tok, QuantEmbedding)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert rel(q.embed.tok(ids), m.embed.tok(ids)) < 1e-2
        assert rel(q.logits(ids), m.logits(ids)) < 4e-2
    assert greedy(q, ids[:, :4], 4).shape == (1, 8)


@pytest.mark.parametrize("bits,emb,head_bits", [(8, False, None), (4, True, None), (4, False, 8)])
def test_save_load_round_trip(tmp_path, bits, emb, head_bits):
    q = quantize_model(tiny(), bits=bits, skip=(), quantize_embedding=emb, head_bits=head_bits)
    assert q.quant_head.bits == (head_bits or bits)
    path = save_quantized(q, tmp_path / "q.safetensors")
    r = load_quantized(path)
    assert r.quant_spec == q.quant_spec
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(r.logits(ids), q.logits(ids))
    assert torch.equal(greedy(r, ids, 5), greedy(q, ids, 5))


def test_save_load_errors(tmp_path):
    with pytest.raises(QuantError):
        save_quantized(tiny(), tmp_path / "x.safetensors")  # not quantized
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(QuantError):
        load_quantized(bad)


# ---- perplexity -------------------------------------------------------------------------------------------
def test_perplexity_matches_a_direct_computation():
    m = tiny()
    ids = torch.randint(0, VOCAB, (50,))
    with torch.no_grad():
        logits = m.logits(ids[None, :])[0, :-1]
        direct = math.exp(F.cross_entropy(logits, ids[1:]).item())
    assert perplexity(m, ids, block=64) == pytest.approx(direct, rel=1e-5)
    # two blocks of 25: each scored from its own start, batched or not
    with torch.no_grad():
        nll = sum(F.cross_entropy(m.logits(c[None])[0, :-1], c[1:], reduction="sum").item()
                  for c in (ids[:25], ids[25:]))
    assert perplexity(m, ids, block=25) == pytest.approx(math.exp(nll / 48), rel=1e-5)
    assert perplexity(m, ids, block=30, batch_size=2) == pytest.approx(perplexity(m, ids, block=30), rel=1e-5)
    with pytest.raises(QuantError):
        perplexity(m, [5])


def test_decode_speed_helper_runs():
    from benchmarks.quant_measure import decode_tokens_per_s  # the measurement CLI lives with the benchmarks

    q = quantize_model(tiny(), bits=8, skip=())
    s = decode_tokens_per_s(q, prompt_len=5, new_tokens=4, repeats=1)
    assert set(s) == {"median", "best", "cpu"} and all(v > 0 for v in s.values())


def test_int8_perplexity_close_to_float():
    m = tiny()
    ids = torch.randint(0, VOCAB, (200,))
    p32 = perplexity(m, ids, block=100)
    p8 = perplexity(quantize_model(copy.deepcopy(m), bits=8, skip=()), ids, block=100)
    assert abs(p8 / p32 - 1) < 0.02
