"""GGUF files of the decoder families, written by llama.cpp's own converter (convert_hf_to_gguf.py, fetched by
`make llamacpp-convert` into .cache/llama.cpp/, or the path in LMFORGE_LLAMA_CONVERT) from the tiny random models
of test_families.py, load in lmforge with the logits of the Hugging Face directory they were converted from.

What the converter drops cannot come back, and the tests say so: llama.cpp's llama (Mistral, Mixtral) and qwen2
have no sliding window, so those files are compared with their directory's config without the window; qwen3moe
cannot hold dense layers, so qwen3_moe's case (mlp_only_layers) does not convert and an all-sparse one is added.

Also, without the converter: the llama3 rope factors (`rope_freqs.weight`) are inverted back to rope parameters
that give the same frequencies.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import perturbed
from test_families import CASES, SMALL, VOCAB, make

from lmforge.checkpoints import build_model, load_checkpoint
from lmforge.checkpoints.gguf import read_gguf
from lmforge.checkpoints.gguf_rope import llama3_parameters
from lmforge.checkpoints.hf import from_hf_state_dict, read_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.model.layers import rope_inv_freq
from lmforge.quant import QuantLinear, kernel_mode

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: $LMFORGE_LLAMA_CONVERT, else what `make llamacpp-convert` fetched."""
    env = os.environ.get("LMFORGE_LLAMA_CONVERT")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted((ROOT / ".cache" / "llama.cpp").glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


CONVERT = converter()
NO_CONVERTER = ("llama.cpp's convert_hf_to_gguf.py not found (run `make llamacpp-convert`, or set "
                "LMFORGE_LLAMA_CONVERT to its path)")


def _qwen3_moe_sparse():
    cfg = transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      norm_topk_prob=True)
    return cfg, transformers.Qwen3MoeForCausalLM


# every family case, plus a qwen3_moe without dense layers (llama.cpp's qwen3moe has none)
FAMILY_CASES = {**CASES, "qwen3_moe_sparse": _qwen3_moe_sparse}
NO_WINDOW = {"mistral", "mixtral", "qwen2"}  # converted to llama / qwen2, which llama.cpp runs without a window
BPE_ONLY = {"olmo2", "qwen3_moe", "qwen3_moe_sparse"}  # converters that read only a tokenizer.json
Q8_CASES = ("mixtral", "phi3")  # experts as 3-D tensors; fused q|k|v and gate|up
Q4_CASES = ("mixtral", "phi3", "qwen3_moe_sparse", "llama3")


def build(case: str):
    if case in CASES:
        return make(case)
    cfg, cls = FAMILY_CASES[case]()
    torch.manual_seed(0)
    model = cls(cfg)
    return perturbed(model)


# ---- tiny tokenizers the converter accepts -------------------------------------------------------------------
_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny tokenizer 0123456789"] * 40


def sentencepiece_model() -> bytes:
    """A SentencePiece BPE model of VOCAB pieces with the ids of SMALL (pad 0, bos 1, eos 2, unk 3)."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TEXT), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2,
                                   unk_id=3, minloglevel=2)
    return buf.getvalue()


def save_bpe_tokenizer(d: Path) -> None:
    """A byte-level BPE (at most VOCAB tokens; <pad> <s> </s> = 0 1 2) as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


# ---- converting every case once --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """case -> {"dir": HF dir, "f32": path or the converter's error, "q8_0": ...}; one converter process for all."""
    if CONVERT is None:
        pytest.skip(NO_CONVERTER)
    root = tmp_path_factory.mktemp("llamacpp")
    spm = sentencepiece_model()
    jobs, out = [], {}
    for case in FAMILY_CASES:
        d = root / case
        build(case).save_pretrained(d)
        if case in BPE_ONLY:
            save_bpe_tokenizer(d)
        else:
            (d / "tokenizer.model").write_bytes(spm)
        out[case] = {"dir": d}
        for outtype in ("f32", "q8_0") if case in Q8_CASES else ("f32",):
            jobs.append({"case": case, "model": str(d), "outfile": str(root / f"{case}-{outtype}.gguf"),
                         "outtype": outtype, "pre": "dbrx" if case == "olmo2" else "qwen2"})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_convert.py")), str(CONVERT),
                          str(root / "jobs.json"), str(root / "results.json")], env=env, capture_output=True,
                         text=True, timeout=900)
    if run.returncode != 0:
        pytest.fail(f"the converter driver failed: {run.stderr.strip().splitlines()[-1:]}")
    for job, result in zip(jobs, json.loads((root / "results.json").read_text())):
        out[job["case"]][job["outtype"]] = Path(job["outfile"]) if result == "ok" else result
    return out


# why the converter refuses a case, where it is known
REFUSED = {"qwen3_moe": "llama.cpp's qwen3moe has no dense MLP layers, this case's mlp_only_layers=[1] has one"}


def gguf_file(converted: dict, case: str, outtype: str = "f32") -> Path:
    got = converted[case][outtype]
    if not isinstance(got, Path):
        why = f" ({REFUSED[case]})" if case in REFUSED else ""
        pytest.skip(f"llama.cpp's converter refuses the {case} case{why}: {got}")
    return got


def reference(case: str, d: Path):
    """Our model of the HF directory; for NO_WINDOW cases the same directory's config without its window."""
    if case not in NO_WINDOW:
        return load_checkpoint(d, tokenizer=False).model
    hf = json.loads((d / "config.json").read_text()) | {"sliding_window": None, "use_sliding_window": False}
    cfg = ModelConfig.from_hf(hf)
    body, _heads = from_hf_state_dict(cfg, read_state_dict(d), str(d))
    return build_model(cfg, body, str(d), torch.float32, "cpu")


IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))  # past phi3's original 16


# ---- the tests ----------------------------------------------------------------------------------------------
@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_converted_gguf_logits_equal_the_hf_directory(case, converted):
    path = gguf_file(converted, case)
    d = converted[case]["dir"]
    ck = read_gguf(path, tensors=False)
    want = {"llama3": "llama", "mistral": "llama", "qwen3_moe_sparse": "qwen3_moe"}.get(case, case)
    assert ck.cfg.family == want
    if case in NO_WINDOW:  # the reason the reference drops the window: the file carries none
        assert ck.cfg.sliding_window is None and not any("sliding_window" in k for k in ck.metadata)
    ours = load_checkpoint(path, tokenizer=False).model
    with torch.no_grad():
        got, ref = ours.logits(IDS), reference(case, d).logits(IDS)
    assert (got - ref).abs().max() < TOL


@pytest.mark.llamacpp
def test_the_converted_llama3_rope_and_phi3_longrope_come_back(converted):
    llama3 = read_gguf(gguf_file(converted, "llama3"), tensors=False).cfg
    assert llama3.rope_scaling["rope_type"] == "llama3"
    orig = ModelConfig.load(converted["llama3"]["dir"] / "config.json")
    torch.testing.assert_close(rope_inv_freq(16, 1e4, llama3.rope_scaling), rope_inv_freq(16, 1e4, orig.rope_scaling),
                               rtol=1e-6, atol=0)
    phi3 = read_gguf(gguf_file(converted, "phi3"), tensors=False).cfg
    want = ModelConfig.load(converted["phi3"]["dir"] / "config.json")
    assert phi3.rotary_fraction == 0.5 and phi3.sliding_window == want.sliding_window == 9
    for key in ("rope_type", "short_factor", "long_factor", "original_max_position_embeddings"):
        assert phi3.rope_scaling[key] == want.rope_scaling[key], key


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", Q8_CASES)
def test_q8_0_conversion_on_the_float_and_the_int8_paths(case, converted):
    path = gguf_file(converted, case, "q8_0")
    ck = read_gguf(path)
    assert ck.file_type == "Q8_0"
    flt = load_checkpoint(path, tokenizer=False).model
    q = load_checkpoint(path, tokenizer=False, quantized=True).model
    spec = q.quant_spec
    per_layer = {"mixtral": 4 + 4 * 3, "phi3": 7}[case]  # q k v o + each expert's 3 | q k v o gate up down
    assert spec.describe() == "int8 (from Q8_0 file)" and len(spec.modules) == 3 * per_layer
    ref = reference(case, converted[case]["dir"])
    source = ref.state_dict()
    for name, w in flt.state_dict().items():  # Q8_0 moves each weight by at most about one step of its block
        assert (w - source[name]).abs().max() <= source[name].abs().max() / 127 + 1e-6, name
    for name in spec.modules:  # every expert and every piece of a fused tensor, at its own rows
        w = flt.get_submodule(name).weight
        assert (q.get_submodule(name).dequantize() - w).abs().max() <= w.abs().max() / 127 + 1e-6, name
    with torch.no_grad():
        want, got = ref.logits(IDS), flt.logits(IDS)
        with kernel_mode(q, "dequant"):
            qd = q.logits(IDS)
    # close to the source, not equal (a router may flip a near tie: the mean, not the worst token)
    assert 0 < (got - want).abs().mean() < 0.01 * want.abs().max()
    assert (qd - got).abs().mean() < 0.01 * got.abs().max()


def requantize(src: Path, dst: Path, qtype: gguf.GGMLQuantizationType) -> Path:
    """A copy of a GGUF file with every matrix (3-D expert tensors included) quantized to `qtype`."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = int(gguf.LlamaFileType[f"MOSTLY_{qtype.name}"]) if name == "general.file_type" else f.contents()
        w.add_key_value(name, value, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        a = np.asarray(t.data, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
        if a.ndim >= 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(t.name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", Q4_CASES)
def test_q4_0_experts_and_fused_pieces_load_as_exact_int4(case, converted, tmp_path):
    """A converted file quantized to Q4_0: each expert of a 3-D tensor and each piece of a fused one becomes an
    int4 layer whose weights are the float path's bit for bit (llama's Q/K rows unpermuted too)."""
    path = requantize(gguf_file(converted, case), tmp_path / f"{case}-q4_0.gguf", gguf.GGMLQuantizationType.Q4_0)
    flt = load_checkpoint(path, tokenizer=False).model
    q = load_checkpoint(path, tokenizer=False, quantized=True).model
    assert q.quant_spec.describe() == "int4 (from Q4_0 file)"
    linears = [n for n, m in flt.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    assert sorted(q.quant_spec.modules) == sorted(linears)
    for name in linears:
        assert isinstance(q.get_submodule(name), QuantLinear)
        assert torch.equal(q.get_submodule(name).dequantize(), flt.get_submodule(name).weight), name
    with torch.no_grad(), kernel_mode(q, "dequant"):
        torch.testing.assert_close(q.logits(IDS), flt.logits(IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.llamacpp
def test_an_unread_architecture_key_is_refused_with_its_name(converted, tmp_path):
    src = gguf_file(converted, "qwen3")
    r = gguf.GGUFReader(src)
    dst = tmp_path / "window.gguf"
    w = gguf.GGUFWriter(str(dst), "qwen3")
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_uint32("qwen3.attention.sliding_window", 4)  # not something llama.cpp's qwen3 reads: not dropped here
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as e:
        read_gguf(dst, tensors=False)
    msg = str(e.value)
    assert "\n" not in msg and "'qwen3.attention.sliding_window' = 4 is not supported" in msg


# ---- without the converter: llama3's rope_freqs back to rope parameters ----------------------------------------
def llama_cpp_rope_factors(dim: int, base: float, factor: float, low: float, high: float, old_ctx: float
                           ) -> list[float]:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, as llama.cpp writes `rope_freqs.weight`."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).tolist()  # stored as float32


LLAMA3_ROPES = {  # (head dim, theta, factor, low_freq_factor, high_freq_factor, original context)
    "llama-3.1-8b": (128, 500000.0, 8.0, 1.0, 4.0, 8192),
    "llama-3.2-1b": (64, 500000.0, 32.0, 1.0, 4.0, 8192),
    "tiny, one factor between the plateaus": (16, 10000.0, 8.0, 1.0, 4.0, 16),
    "no factor between the plateaus": (16, 10000.0, 8.0, 3.9, 4.0, 40),
    "every frequency scaled": (16, 10000.0, 8.0, 1.0, 4.0, 2),
}


@pytest.mark.parametrize("name", list(LLAMA3_ROPES))
def test_llama3_rope_freqs_invert_to_the_same_frequencies(name):
    dim, theta, factor, low, high, ctx = LLAMA3_ROPES[name]
    orig = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": ctx}
    back = llama3_parameters(llama_cpp_rope_factors(dim, theta, factor, low, high, ctx), dim, theta, "t.gguf")
    torch.testing.assert_close(rope_inv_freq(dim, theta, back), rope_inv_freq(dim, theta, orig), rtol=1e-6, atol=0)
    if name.startswith("llama-3"):  # enough factors between the plateaus: Llama's own values come back
        assert back == orig


def test_rope_freqs_that_fit_no_llama3_curve_are_refused():
    with pytest.raises(CheckpointError) as e:
        llama3_parameters([1.0, 3.0, 2.0, 8.0, 8.0, 8.0, 8.0, 8.0], 16, 10000.0, "t.gguf")
    assert str(e.value) == ("t.gguf: GGUF tensor 'rope_freqs.weight' holds per-frequency factors that no llama3 "
                            "rope scaling gives (not supported)")
    assert llama3_parameters([1.0] * 8, 16, 10000.0, "t.gguf") is None  # no scaling at all


def test_a_llama3_gguf_written_here_matches_transformers(tmp_path):
    """rope_freqs.weight as llama.cpp computes it, in a llama GGUF laid out as its converter does (test_gguf's
    writer), gives transformers' llama3 logits."""
    from test_gguf import write_gguf_from_hf

    hf = make("llama3")
    rp = hf.config.rope_parameters
    factors = llama_cpp_rope_factors(16, rp["rope_theta"], rp["factor"], rp["low_freq_factor"],
                                     rp["high_freq_factor"], rp["original_max_position_embeddings"])
    path = write_gguf_from_hf(tmp_path / "llama3.gguf", hf, "llama",
                              extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)})
    ours = load_checkpoint(path, tokenizer=False).model
    with torch.no_grad():
        assert (ours.logits(IDS) - hf(IDS).logits).abs().max() < TOL
