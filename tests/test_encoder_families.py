"""Encoder families beyond BERT (issue 35): roberta and xlm-roberta, on tiny random models transformers builds from
their own config classes (positions counted from the padding index + 1, as those models do):

- hidden states and the pooler equal transformers' (float32) on unpadded, left- and right-padded batches;
- a RobertaForSequenceClassification checkpoint loads as lmforge's SequenceClassifier with equal logits, and
  lmforge's save_pretrained of it loads back in transformers with equal logits.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import classifier_from, padded_batch, perturbed

from lmforge.checkpoints import load_checkpoint, save_pretrained
from lmforge.model.heads import SequenceClassifier

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
CASES = {"roberta": transformers.RobertaConfig, "xlm-roberta": transformers.XLMRobertaConfig}
MODELS = {"roberta": (transformers.RobertaModel, transformers.RobertaForSequenceClassification),
          "xlm-roberta": (transformers.XLMRobertaModel, transformers.XLMRobertaForSequenceClassification)}


def make(case: str, head: bool = False):
    torch.manual_seed(0)
    cfg = CASES[case](**SMALL, num_labels=3)
    model = MODELS[case][1 if head else 0](cfg)
    return perturbed(model)


batch = partial(padded_batch, pad_id=SMALL["pad_token_id"], vocab=VOCAB)  # batch(padding) -> (ids, mask)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """What transformers computes from the ids for right padding, for any padding: real tokens from pad + 1."""
    return (mask.cumsum(-1) * mask + SMALL["pad_token_id"]).long()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_hidden_states_and_pooler_match(case, padding, tmp_path):
    hf = make(case)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path, tokenizer=False).model
    assert ours.cfg.family == case and ours.cfg.position_offset == 2 and ours.cfg.context_length == 38
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask))
        h = ours(ids, mask)
    real = mask.bool()
    assert (h - ref.last_hidden_state)[real].abs().max() < TOL
    assert (torch.tanh(ours.pooler(h[:, 0])) - ref.pooler_output)[mask[:, 0].bool()].abs().max() < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_classifier_loads_and_saves_back(case, tmp_path):
    hf = make(case, head=True)
    model = classifier_from(hf, tmp_path / "hf")
    ids, mask = batch("right")
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        got = model(ids, mask)
    assert (got - want).abs().max() < TOL
    save_pretrained(model, tmp_path / "ours")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - want).abs().max() < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_every_config_field_is_read_or_inert(case):
    from lmforge.families import BY_NAME, COMMON_INERT

    spec = BY_NAME[case]
    fields = set(CASES[case](**SMALL).to_dict())
    unknown = sorted(f for f in fields if f not in spec.reads | spec.inert | COMMON_INERT and not f.startswith("_"))
    assert not unknown, f"{case}: config fields neither read nor known inert: {unknown}"


def test_a_masked_lm_checkpoint_without_pooler_loads(tmp_path, caplog):
    """roberta-base ships as RobertaForMaskedLM: no pooler, an lm_head. The encoder loads (the MLM head is not part
    of it; the pooler starts untrained, said once) and computes transformers' hidden states."""
    import logging

    torch.manual_seed(0)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**SMALL)).eval()
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        ours = load_checkpoint(tmp_path, tokenizer=False).model
    assert any("no pooler in the checkpoint" in r.getMessage() for r in caplog.records)
    ids, mask = batch("right")
    with torch.no_grad():
        want = hf.roberta(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert (got - want)[mask.bool()].abs().max() < TOL


DISTIL = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=40,
              pad_token_id=0)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_distilbert_hidden_states_match(padding, tmp_path):
    torch.manual_seed(0)
    hf = perturbed(transformers.DistilBertModel(transformers.DistilBertConfig(**DISTIL)))
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path, tokenizer=False).model
    assert ours.cfg.family == "distilbert" and ours.pooler is None
    ids, mask = batch(padding)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, None if padding == "none" else mask)
    # transformers numbers positions 0..T-1 whatever the padding; lmforge counts real tokens (left padding moves
    # them), so compare left-padded rows on the unpadded one only
    rows = mask.bool() if padding != "left" else mask.bool() & (torch.arange(2) == 1)[:, None]
    assert (got - want)[rows].abs().max() < TOL


def test_distilbert_classifier_loads_trains_and_saves_back(tmp_path):
    torch.manual_seed(0)
    hf = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**DISTIL, num_labels=3))
    model = classifier_from(hf.eval(), tmp_path / "hf")
    ids, mask = batch("right")
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        assert (model(ids, mask) - want).abs().max() < TOL
    # a classifier built on the bare encoder gets distilbert's pre_classifier, and saves as transformers' class
    base = transformers.DistilBertModel(transformers.DistilBertConfig(**DISTIL))
    base.save_pretrained(tmp_path / "base")
    fresh = SequenceClassifier(load_checkpoint(tmp_path / "base", tokenizer=False).model, 3).eval()
    fresh.backbone.cfg.id2label = {0: "a", 1: "b", 2: "c"}
    save_pretrained(fresh, tmp_path / "ours")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "DistilBertForSequenceClassification"
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - fresh(ids, mask)).abs().max() < TOL


def test_distilbert_config_fields_are_read_or_inert():
    from lmforge.families import BY_NAME, COMMON_INERT

    spec = BY_NAME["distilbert"]
    fields = set(transformers.DistilBertConfig(**DISTIL).to_dict())
    unknown = sorted(f for f in fields if f not in spec.reads | spec.inert | COMMON_INERT and not f.startswith("_"))
    assert not unknown, f"distilbert: config fields neither read nor known inert: {unknown}"
