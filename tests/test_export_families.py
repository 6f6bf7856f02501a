"""GGUF export of the Qwen families (issue 35): lmforge writes qwen2 (q/k/v biases) and qwen3 (per-head q/k norms)
as llama.cpp's architectures of the same names. A tiny transformers model with a byte-level tokenizer is exported
in f32 and read back with the HF directory's logits, q8_0 within quantization; where llama-cpp-python is
installed, llama.cpp decodes the f32 file greedily as lmforge does. A Qwen2 with a sliding window, which llama.cpp's
qwen2 would ignore, is refused."""

from __future__ import annotations

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
