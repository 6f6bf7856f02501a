"""Shared fixtures and helpers: tiny random models built and saved with transformers (the reference), the
encoder tests' batch and classifier loader, the serve tests' tiny llama, its int8 copy and a started server."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("llama", "gpt2", "gemma3", "bert")


def make_hf_model(family: str, seed: int = 0, vocab: int = 96):
    """A tiny random transformers model of `family`, in float32 and eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
                                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
            head_dim=32, intermediate_size=96, max_position_embeddings=128, sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.Gemma3ForCausalLM(cfg)
    elif family == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
        model = transformers.BertModel(cfg)
    else:  # pragma: no cover
        raise ValueError(family)
    return perturbed(model)


def perturbed(model):
    """The transformers model with every weight moved off its init value (norms start at 1 or 0, biases at 0),
    in float32 and eval mode: a parity test on untouched norms would not see them."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


def padded_batch(padding: str, pad_id: int, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded rows of 14 ids (in [3, vocab)) and their mask; padding "left" / "right" pads 5 of row 0 with
    pad_id, "none" pads nothing: the batch the encoder parity tests compare on."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :5] = 0
    elif padding == "right":
        mask[0, -5:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def classifier_from(hf, path: Path, num_labels: int = 3):
    """A transformers *ForSequenceClassification saved to `path`, loaded as lmforge's SequenceClassifier (eval)."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.checkpoints.hf import load_into
    from lmforge.model.heads import SequenceClassifier

    hf.save_pretrained(path)
    ck = load_checkpoint(path, tokenizer=False)
    model = SequenceClassifier(ck.model, num_labels).eval()
    load_into(model.score, {k.split(".", 1)[1]: v for k, v in ck.heads.items()}, "test")
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory written by transformers' save_pretrained."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(f"hf-{fam}")
        make_hf_model(fam).save_pretrained(d)
        out[fam] = d
    return out


# ---- the tiny llama the serve tests share (test_serve, test_serve_openai, test_serve_batching) -------------
@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine 2 OpenMP threads are 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from test_serve import tiny_tokenizer

    d = tmp_path_factory.mktemp("serve-llama")
    tok = tiny_tokenizer()
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def gen(tiny_dir):
    from lmforge.generator import Generator

    return Generator.load(tiny_dir)


@pytest.fixture(scope="module")
def int8_gen(tiny_dir):
    """The tiny llama with int8 decode weights (DECODE_PRESETS[8]); skips where the preset does not fit its shapes."""
    from lmforge.generator import Generator
    from lmforge.quant import DECODE_PRESETS, quantize_model

    qgen = Generator.load(tiny_dir)
    try:
        qgen.model = quantize_model(qgen.model, **DECODE_PRESETS[8])
    except Exception as e:  # noqa: BLE001 - the tiny shapes may not fit a preset's groups
        pytest.skip(f"int8 preset does not apply to the tiny model: {e}")
    return qgen


@contextmanager
def serving(gen, **settings):
    """test_serve.start_server(gen) with these ServeSettings for a with-block (a fixture's yield), stopped after."""
    from test_serve import start_server

    srv = start_server(gen, settings=settings)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def own(monkeypatch):
    """lmforge's own AVX2 kernels on (skipped where they do not build)."""
    from lmforge import cpu_kernels

    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "on")
    if not cpu_kernels.available():
        pytest.skip(f"lmforge's AVX2 kernels are not available here: {cpu_kernels.failure()}")


@pytest.fixture(scope="module")
def invariance_model_dir(tmp_path_factory):
    """A 4-layer llama (GQA, 128 wide) with the serving tests' tokenizer, saved by transformers: the batch
    invariance tests' model (tests/test_serve_invariance.py, tests/test_generate_invariance.py)."""
    pytest.importorskip("transformers")
    from test_serve import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("invariance"), hidden=128, heads=4, kv_heads=2, context=512)
