"""Our Transformer vs transformers on tiny random models of every family (float32, tolerance 1e-5)."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoints import load_checkpoint, save_pretrained
from lmforge.decoding import greedy

transformers = pytest.importorskip("transformers")
from conftest import FAMILIES, padded_batch  # noqa: E402

TOL = 1e-5
DECODERS = ("llama", "gpt2", "gemma3")


def _reference(hf_model, ids, mask, padding):
    kw = {}
    if padding != "none":
        # transformers numbers positions 0..T-1 unless told; we count real tokens (left-padding safe).
        kw = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return hf_model(ids, output_hidden_states=True, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_and_hidden_states_match(family, padding, hf_dirs):
    hf_model = transformers.AutoModel.from_pretrained(hf_dirs[family]) if family == "bert" else \
        transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[family])
    hf_model.eval()
    ours = load_checkpoint(hf_dirs[family], tokenizer=False).model
    ids, mask = padded_batch(padding, 0, ours.cfg.vocab_size)
    ref = _reference(hf_model, ids, mask, padding)
    with torch.no_grad():
        h, hidden = ours(ids, None if padding == "none" else mask, output_hidden_states=True)
    real = mask.bool()  # outputs at pad positions are not defined
    assert len(hidden) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(hidden, ref.hidden_states)):
        assert (a - b)[real].abs().max() < TOL, f"hidden state {i}"
    if family == "bert":
        assert (h - ref.last_hidden_state)[real].abs().max() < TOL
        pooled = torch.tanh(ours.pooler(h[:, 0]))
        assert (pooled - ref.pooler_output).abs().max() < TOL
    else:
        assert (ours.lm_logits(h) - ref.logits)[real].abs().max() < TOL


def test_left_padding_equals_unpadded():
    """A left-padded row gives the same logits as the same tokens alone (positions count real tokens)."""
    from conftest import make_hf_model

    for fam in ("gpt2", "llama"):
        hf_model = make_hf_model(fam)
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            hf_model.save_pretrained(d)
            ours = load_checkpoint(d, tokenizer=False).model
        ids, mask = padded_batch("left", 0, ours.cfg.vocab_size)
        with torch.no_grad():
            batched = ours.logits(ids, mask)[0, 5:]
            alone = ours.logits(ids[:1, 5:])[0]
        assert (batched - alone).abs().max() < TOL


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_continuation_matches_generate(family, hf_dirs):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[family]).eval()
    ours = load_checkpoint(hf_dirs[family], tokenizer=False).model
    prompt = torch.tensor([[5, 17, 33, 8, 41, 12, 9]])
    with torch.no_grad():
        ref = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=20)
    got = greedy(ours, prompt, max_new_tokens=20)
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_transformers(family, hf_dirs, tmp_path):
    ours = load_checkpoint(hf_dirs[family], tokenizer=False).model
    save_pretrained(ours, tmp_path / "out")
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch("right", 0, ours.cfg.vocab_size)
    with torch.no_grad():
        ref = reloaded(ids, attention_mask=mask)
        h = ours(ids, mask)
    real = mask.bool()
    if family == "bert":
        assert (h - ref.last_hidden_state)[real].abs().max() < TOL
    else:
        assert (ours.lm_logits(h) - ref.logits)[real].abs().max() < TOL
    # and it comes back into lmforge unchanged
    again = load_checkpoint(tmp_path / "out", tokenizer=False).model
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
