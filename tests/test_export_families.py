"""GGUF export of the Qwen families (issue 35): lmforge writes qwen2 (q/k/v biases) and qwen3 (per-head q/k norms)
as llama.cpp's architectures of the same names. A tiny transformers model with a byte-level tokenizer is exported
in f32 and read back with the HF directory's logits, q8_0 within quantization; where llama-cpp-python is
installed, llama.cpp decodes the f32 file greedily as lmforge does. A Qwen2 with a sliding window, which llama.cpp's
qwen2 would ignore, is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import perturbed

from lmforge.checkpoints import load_checkpoint
from lmforge.checkpoints.gguf_write import ExportError
from lmforge.tasks.export import export

transformers = pytest.importorskip("transformers")
from test_export import _greedy_llama_cpp, _greedy_ours, _llama, byte_level_tokenizer, q8_reference  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=False)


def build(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=vocab, **SMALL))
    else:
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=vocab, head_dim=16, **SMALL))
    return perturbed(m)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok = byte_level_tokenizer()
    out = {}
    for kind in ("qwen2", "qwen3"):
        d = tmp_path_factory.mktemp(f"export-{kind}")
        build(kind, tok.vocab_size + 4).save_pretrained(d)
        tok.save(d)
        out[kind] = d
    return out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_round_trip_f32_equal_and_q8_0_within_quantization(kind, dirs, tmp_path):
    src = load_checkpoint(dirs[kind])
    ids = torch.randint(0, src.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    f32 = load_checkpoint(export(dirs[kind], tmp_path / "m.gguf", type="f32"))
    assert f32.cfg.family == kind
    with torch.no_grad():
        want = src.model.logits(ids)
        assert (f32.model.logits(ids) - want).abs().max() < 1e-4
        q8 = load_checkpoint(export(dirs[kind], tmp_path / "q.gguf", type="q8_0"), dtype=torch.float32)
        ref = q8_reference(src.model).logits(ids)
        assert (q8.model.logits(ids) - ref).abs().max() < 1e-3


def test_a_qwen2_sliding_window_is_refused(dirs, tmp_path):
    src = load_checkpoint(dirs["qwen2"])
    src.cfg.sliding_window, src.cfg.layer_types = 4, ["sliding", "sliding"]
    with pytest.raises(ExportError, match="sliding_window"):
        export(src.model, tmp_path / "w.gguf", type="f32", tokenizer=src.tokenizer)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_llama_cpp_decodes_the_export_as_lmforge_does(kind, dirs, tmp_path):
    llm = _llama(export(dirs[kind], tmp_path / "m.gguf", type="f32"))
    src = load_checkpoint(dirs[kind])
    prompt = src.tokenizer.encode("The quick brown fox")
    assert _greedy_llama_cpp(llm, prompt, 32) == _greedy_ours(src.model, prompt, 32)


# ---- every decoder family (issue 35): round trip, and the same file llama.cpp's converter writes ---------------
from test_families import CASES  # noqa: E402
from test_gguf_families import (  # noqa: E402, F401 (converted: the module-scoped fixture, shared)
    NO_WINDOW,
    converted,
    gguf_file,
    reference,
    save_bpe_tokenizer,
)

from lmforge.checkpoints.gguf_config import metadata_of, open_gguf  # noqa: E402
from lmforge.checkpoints.gguf_tensors import tensor_rows  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

EXPORTED = ["llama3", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "phi3", "gemma2"]


def family_model(case: str, vocab: int):
    """test_families' tiny model of `case` with a vocabulary of `vocab` and no feature llama.cpp cannot run:
    Mistral/Mixtral/Qwen2 without their window, qwen3_moe without its dense layer."""
    cfg, cls = CASES[case]()
    cfg.vocab_size = vocab
    if case in NO_WINDOW:
        cfg.sliding_window = None
        cfg.use_sliding_window = False
    if case == "qwen3_moe":
        cfg.mlp_only_layers = []
    if case == "qwen3":
        cfg.attention_bias = False  # llama.cpp's qwen3 has no q/k/v biases (export refuses them)
    torch.manual_seed(0)
    return perturbed(cls(cfg))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    tok = byte_level_tokenizer()
    out = {}
    for case in EXPORTED:
        # a neutral name: llama.cpp reads `general.name` (the directory's) and expects Phi-3's <|end|> when it
        # holds "phi"; this tokenizer has no such token
        d = tmp_path_factory.mktemp("export-family")
        family_model(case, tok.vocab_size + 4).save_pretrained(d)
        tok.save(d)
        out[case] = d
    return out


@pytest.mark.parametrize("case", EXPORTED)
def test_every_decoder_family_round_trips_through_gguf(case, family_dirs, tmp_path):
    src = load_checkpoint(family_dirs[case])
    ids = torch.randint(3, src.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    back = load_checkpoint(export(family_dirs[case], tmp_path / "m.gguf", type="f32"))
    want = {"llama3": "llama", "mistral": "llama"}.get(case, case)  # llama.cpp's llama has no mistral
    assert back.cfg.family == want
    with torch.no_grad():
        assert (back.model.logits(ids) - src.model.logits(ids)).abs().max() < 1e-4
    if case in ("mixtral", "phi3"):  # 3-D expert tensors and fused projections, quantized
        q8 = load_checkpoint(export(family_dirs[case], tmp_path / "q.gguf", type="q8_0"), dtype=torch.float32)
        with torch.no_grad():
            assert (q8.model.logits(ids) - q8_reference(src.model).logits(ids)).abs().max() < 1e-3


@pytest.mark.parametrize("case", ["mistral", "mixtral", "qwen3_moe"])
def test_what_llama_cpp_cannot_run_is_refused(case, tmp_path):
    """Mistral / Mixtral with a window shorter than the context (llama.cpp's llama has none), a qwen3_moe with a
    dense layer (llama.cpp's qwen3moe has none)."""
    tok = byte_level_tokenizer()
    d = tmp_path / "m"
    cfg, cls = CASES[case]()  # the test_families case: a window / mlp_only_layers=[1]
    cfg.vocab_size = tok.vocab_size + 4
    cls(cfg).save_pretrained(d)
    tok.save(d)
    with pytest.raises(ExportError, match="sliding_window" if case != "qwen3_moe" else "dense_layers"):
        export(d, tmp_path / "m.gguf", type="f32")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", [c for c in EXPORTED if c != "qwen3"])  # test_gguf_families' qwen3 has biases
def test_the_export_is_the_file_llama_cpp_converter_writes(case, converted, tmp_path):  # noqa: F811
    """Same architecture, model keys and tensors (names, shapes, f32 values) as convert_hf_to_gguf.py's file of the
    same directory; the tokenizer keys are not compared (the converter's tokenizer is another one)."""
    theirs = gguf_file(converted, case if case != "qwen3_moe" else "qwen3_moe_sparse")
    d = converted[case if case != "qwen3_moe" else "qwen3_moe_sparse"]["dir"]
    model = reference(case, d)
    save_bpe_tokenizer(tmp_path)
    ours = export(model, tmp_path / "ours.gguf", type="f32", tokenizer=Tokenizer.from_dir(tmp_path))
    a, b = open_gguf(ours), open_gguf(theirs)
    ma, mb = metadata_of(a), metadata_of(b)
    arch = mb["general.architecture"]
    assert ma["general.architecture"] == arch
    keys_b = {k for k in mb if k.startswith(arch + ".")}
    keys_a = {k for k in ma if k.startswith(arch + ".")}
    assert keys_b - keys_a == set(), f"keys the converter writes and lmforge does not: {keys_b - keys_a}"
    for k in keys_b:
        va, vb = ma[k], mb[k]
        if isinstance(vb, float):
            assert va == pytest.approx(vb, rel=1e-6), k
        else:
            assert va == vb, k
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in tb.items():
        assert list(ta[name].shape) == list(t.shape), name
        np.testing.assert_allclose(np.asarray(tensor_rows(ta[name]), np.float32),
                                   np.asarray(tensor_rows(t), np.float32), rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", EXPORTED)
def test_llama_cpp_decodes_every_family_export_as_lmforge_does(case, family_dirs, tmp_path):
    """phi3 here without longrope and its window: llama.cpp picks Phi-3's long rope factors for the whole context
    once n_ctx passes the original context (transformers and lmforge: once the sequence does), so a longrope model
    decodes differently there from the first token; the file itself equals the converter's (test above)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if case == "phi3":
        cfg, cls = CASES[case]()
        cfg.vocab_size, cfg.sliding_window = load_checkpoint(family_dirs[case]).cfg.vocab_size, None
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        torch.manual_seed(0)
        d = tmp_path / "plain"
        perturbed(cls(cfg)).save_pretrained(d)
        byte_level_tokenizer().save(d)
        family_dirs = {case: d}
    # n_ctx within the tiny models' 64 positions: llama.cpp refuses a longrope (phi3) context past the trained one
    llm = llama_cpp.Llama(model_path=str(export(family_dirs[case], tmp_path / "m.gguf", type="f32")), n_ctx=64,
                          n_threads=2, verbose=False)
    src = load_checkpoint(family_dirs[case])
    prompt = src.tokenizer.encode("The quick brown fox")
    assert _greedy_llama_cpp(llm, prompt, 32) == _greedy_ours(src.model, prompt, 32)
