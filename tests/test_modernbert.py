"""ModernBERT (issue 35): tiny random models transformers builds from ModernBertConfig, with local attention shorter
than the test sequences and alternating local / global layers, perturbed off their init (the bias-free LayerNorms
included) and saved with save_pretrained:

- hidden states equal transformers' (float32) on unpadded, left- and right-padded batches;
- ModernBertForSequenceClassification (cls and mean pooling) loads as lmforge's SequenceClassifier with equal logits,
  and lmforge's save_pretrained of it loads back in transformers with equal logits;
- a masked-LM checkpoint (how ModernBERT-base ships) loads: its head.* becomes the classifier's starting head;
- `lmforge classify train` (full and LoRA, merged on save) and `lmforge qa train` run on it, and their output loads
  in transformers with the logits lmforge gives;
- every ModernBertConfig field is read or inert, and an unknown one with a value is refused.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from conftest import classifier_from, padded_batch, perturbed

from lmforge.checkpoints import load_checkpoint, save_pretrained
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.heads import SequenceClassifier

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 96
# local_attention 6: a local layer sees |i - j| <= 3, far less than the 14-token test rows
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64, local_attention=6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             cls_token_id=1, sep_token_id=2,
             layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})


def config(**kw):
    return transformers.ModernBertConfig(**{**SMALL, **kw})


def make(cls, **kw):
    torch.manual_seed(0)
    return perturbed(cls(config(**kw)))


batch = partial(padded_batch, pad_id=SMALL["pad_token_id"], vocab=VOCAB)  # batch(padding) -> (ids, mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """lmforge numbers the real tokens of a row from 0 whatever the padding; transformers takes these when given."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_hidden_states_match(padding, tmp_path):
    hf = make(transformers.ModernBertModel)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path, tokenizer=False).model
    cfg = ours.cfg
    assert cfg.family == "modernbert" and cfg.sliding_window == 4 and cfg.layer_types == ["full", "sliding"] * 2
    assert (cfg.rope_theta, cfg.rope_local_theta) == (160000.0, 1000.0) and ours.pooler is None
    assert isinstance(ours.blocks[0].norm1, torch.nn.Identity) and ours.norm.bias is None
    ids, mask = batch(padding)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        got = ours(ids, None if padding == "none" else mask)
    assert (got - want)[mask.bool()].abs().max() < TOL


def test_the_window_and_the_local_theta_matter(tmp_path):
    """The parity above could not pass with a wrong window or local rotary base: each changes the output."""
    hf = make(transformers.ModernBertModel)
    hf.save_pretrained(tmp_path)
    ids, _ = batch("none")
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        for change in ({"sliding_window": 5}, {"rope_local_theta": 160000.0}, {"layer_types": None}):
            ours = load_checkpoint(tmp_path, tokenizer=False).model
            for k, v in change.items():
                setattr(ours.cfg, k, v)
            ours.init_buffers()
            assert (ours(ids) - want).abs().max() > 1e-3, change


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("classifier_bias", [False, True])
def test_sequence_classifier_loads_and_saves_back(pooling, classifier_bias, tmp_path):
    hf = make(transformers.ModernBertForSequenceClassification, num_labels=3, classifier_pooling=pooling,
              classifier_bias=classifier_bias)
    model = classifier_from(hf, tmp_path / "hf")
    assert model.pooling == pooling and model.backbone.pooler_norm is not None
    ids, mask = batch("right")
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        assert (model(ids, mask) - want).abs().max() < TOL
    save_pretrained(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["classifier_pooling"] == pooling and saved["local_attention"] == 6
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "ModernBertForSequenceClassification"
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - want).abs().max() < TOL


def test_a_masked_lm_checkpoint_loads_with_its_head_as_the_classifier_start(tmp_path):
    """ModernBERT-base ships as ModernBertForMaskedLM (head + tied decoder with a bias): the encoder loads, the
    decoder is dropped, and head.* starts the classifier, as transformers' ForSequenceClassification does."""
    mlm = make(transformers.ModernBertForMaskedLM)
    mlm.save_pretrained(tmp_path / "mlm")
    ck = load_checkpoint(tmp_path / "mlm", tokenizer=False)
    ids, mask = batch("right")
    with torch.no_grad():
        want = mlm.model(ids, attention_mask=mask).last_hidden_state
        assert (ck.model(ids, mask) - want)[mask.bool()].abs().max() < TOL
    hf = transformers.ModernBertForSequenceClassification.from_pretrained(tmp_path / "mlm", num_labels=3).eval()
    model = SequenceClassifier(ck.model, 3).eval()
    with torch.no_grad():
        model.score.weight.copy_(hf.classifier.weight)
        model.score.bias.copy_(hf.classifier.bias)
        assert (model(ids, mask) - hf(ids, attention_mask=mask).logits).abs().max() < TOL


def test_a_classifier_on_the_bare_encoder_gets_the_head_and_saves_as_transformers_class(tmp_path):
    make(transformers.ModernBertModel).save_pretrained(tmp_path / "base")
    ck = load_checkpoint(tmp_path / "base", tokenizer=False)
    ck.model.cfg.id2label = {0: "a", 1: "b", 2: "c"}
    fresh = SequenceClassifier(ck.model, 3, "mean").eval()
    assert fresh.backbone.pooler is not None and fresh.backbone.pooler.bias is None
    save_pretrained(fresh, tmp_path / "ours")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert back.config.classifier_pooling == "mean"
    ids, mask = batch("right")
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - fresh(ids, mask)).abs().max() < TOL


@pytest.mark.parametrize("lora", [False, True])
def test_classify_train_runs_and_saves_a_transformers_classifier(lora, tmp_path):
    from test_classify import toy_rows, write_csv
    from test_serve import tiny_tokenizer

    from lmforge.tasks.classify import ClassifyConfig, load_classifier, train
    from lmforge.train.config import TrainConfig

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    transformers.ModernBertModel(config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id or 0)).save_pretrained(
        tmp_path / "base")
    tok.save(tmp_path / "base")
    data = write_csv(tmp_path / "train.csv", toy_rows(32, seed=1))
    c = ClassifyConfig(model=str(tmp_path / "base"), data=str(data), max_length=16, pooling="mean", lora=lora)
    tc = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=16, lr=1e-3, progress=False, seed=0)
    run = train(c, tc, log=lambda *_: None)
    lc = load_classifier(run["run_dir"])
    final = next(p for p in (tmp_path / "run").rglob("config.json") if (p.parent / "model.safetensors").exists())
    back = transformers.AutoModelForSequenceClassification.from_pretrained(final.parent).eval()
    assert back.config.classifier_pooling == "mean"
    ids, mask = batch("right")
    with torch.no_grad():
        assert (back(ids, attention_mask=mask).logits - lc.model(ids, mask)).abs().max() < TOL


def test_every_config_field_is_read_or_inert():
    from lmforge.families import BY_NAME, COMMON_INERT

    spec = BY_NAME["modernbert"]
    fields = set(config().to_dict())
    unknown = sorted(f for f in fields if f not in spec.reads | spec.inert | COMMON_INERT and not f.startswith("_"))
    assert not unknown, f"modernbert: config fields neither read nor known inert: {unknown}"


def test_an_unknown_field_or_rope_scaling_is_refused(tmp_path):
    make(transformers.ModernBertModel).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    ModelConfig.from_hf(dict(hf))
    with pytest.raises(ConfigError, match="'attention_sink_size'"):
        ModelConfig.from_hf({**hf, "attention_sink_size": 4})
    ModelConfig.from_hf({**hf, "attention_sink_size": None})
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="rope_parameters"):
        ModelConfig.from_hf({**hf, "rope_parameters": {**hf["rope_parameters"], "sliding_attention": linear}})
    with pytest.raises(ConfigError, match="classifier_pooling"):
        ModelConfig.from_hf({**hf, "classifier_pooling": "max"})


def test_the_hub_spelling_of_layer_pattern_and_thetas_is_read():
    """ModernBERT-base's config.json predates layer_types / rope_parameters: global_attn_every_n_layers and
    global / local_rope_theta, plus keys transformers' ModernBERT does not read (layer_norm_eps, ...)."""
    hub = {"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"], "vocab_size": 50368,
           "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22, "num_attention_heads": 12,
           "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
           "local_attention": 128, "layer_norm_eps": 1e-5, "norm_eps": 1e-5, "norm_bias": False,
           "position_embedding_type": "absolute", "classifier_pooling": "mean", "reference_compile": True,
           "repad_logits_with_grad": False, "gradient_checkpointing": False, "pad_token_id": 50283}
    cfg = ModelConfig.from_hf(hub)
    want = transformers.ModernBertConfig(**{k: v for k, v in hub.items() if k != "model_type"})
    assert cfg.layer_types == ["sliding" if t == "sliding_attention" else "full" for t in want.layer_types]
    assert cfg.sliding_window == 65 and cfg.pooling == "mean" and cfg.pooler
    assert (cfg.rope_theta, cfg.rope_local_theta) == (160000.0, 10000.0)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_question_answering_loads_and_saves_back(padding, tmp_path):
    """ModernBertForQuestionAnswering: the prediction head on every token, then `classifier` (start, end): lmforge's
    SpanHead with equal logits, and a directory transformers loads back with equal logits."""
    from lmforge.tasks.qa.model import load_qa

    hf = make(transformers.ModernBertForQuestionAnswering)
    hf.save_pretrained(tmp_path / "hf")
    from test_serve import tiny_tokenizer

    tiny_tokenizer().save(tmp_path / "hf")
    model = load_qa(tmp_path / "hf").model
    ids, mask = batch(padding)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask)
        start, end = model(ids, mask)
        real = mask.bool()
        assert (start - want.start_logits)[real].abs().max() < TOL and (end - want.end_logits)[real].abs().max() < TOL
    save_pretrained(model, tmp_path / "ours")
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == "ModernBertForQuestionAnswering"
    with torch.no_grad():
        got = back(ids, attention_mask=mask)
        assert (got.start_logits - want.start_logits)[real].abs().max() < TOL
    again = load_checkpoint(tmp_path / "ours", tokenizer=False)
    assert again.cfg.pooler and set(again.heads) == {"score.weight", "score.bias"}


def test_qa_train_runs_and_saves_a_transformers_qa_model(tmp_path):
    """`lmforge qa train` on a bare ModernBertModel: the span head gets ModernBERT's prediction head, and the run's
    model loads in transformers' AutoModelForQuestionAnswering with the logits lmforge gives."""
    from test_qa import WINDOW, wordpiece_tokenizer, write_squad

    from lmforge.tasks.qa import QAConfig, train
    from lmforge.tasks.qa.model import load_qa
    from lmforge.train import TrainConfig

    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    transformers.ModernBertModel(config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)).save_pretrained(
        tmp_path / "base")
    tok.save(tmp_path / "base")
    c = QAConfig(model=str(tmp_path / "base"), data=str(write_squad(tmp_path / "train.json", 32, seed=1)), **WINDOW)
    tc = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=16, lr=1e-3, progress=False,
                     plot=False, seed=0)
    run = train(c, tc, log=lambda *_: None)
    lq = load_qa(run["run_dir"])
    final = next(p for p in (tmp_path / "run").rglob("config.json") if (p.parent / "model.safetensors").exists())
    back = transformers.AutoModelForQuestionAnswering.from_pretrained(final.parent).eval()
    ids, mask = batch("right")
    with torch.no_grad():
        start, _ = lq.model(ids, mask)
        assert (back(ids, attention_mask=mask).start_logits - start)[mask.bool()].abs().max() < TOL
