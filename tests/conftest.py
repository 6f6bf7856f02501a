"""Shared fixtures: tiny random models built and saved with transformers (the reference)."""

from __future__ import annotations

import os
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
