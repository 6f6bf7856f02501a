"""Encoder families: BERT, RoBERTa / XLM-RoBERTa (positions offset by the padding index), DistilBERT and ModernBERT
(rotary, alternating local / global attention, GeGLU); each a config.json <-> ModelConfig translation and a
FamilySpec."""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError
from lmforge.families.spec import (
    HF_ACT,
    FamilySpec,
    act,
    common_tokens,
    hf_common,
    hf_layer_types,
    layer_types,
    require,
    rope,
    short,
)


def _from_bert(hf: dict[str, Any]) -> dict[str, Any]:
    pet = hf.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise ConfigError(f"field 'position_embedding_type' = {pet!r} is not implemented (absolute only)")
    return dict(family="bert", vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 512),
                d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                d_ff=hf["intermediate_size"], norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
                norm_placement="post", final_norm=False, embed_norm=True, mlp="gelu",
                activation=act(hf.get("hidden_act", "gelu")), attn_bias=True, mlp_bias=True, position="learned",
                causal=False, type_vocab_size=hf.get("type_vocab_size", 2), tie_embeddings=True, pooler=True,
                **common_tokens(hf))


def _to_bert(c: Any) -> dict[str, Any]:
    return {"model_type": "bert", "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "intermediate_size": c.d_ff, "layer_norm_eps": c.norm_eps, "hidden_act": HF_ACT[c.activation],
            "type_vocab_size": c.type_vocab_size, "hidden_dropout_prob": c.dropout,
            "attention_probs_dropout_prob": c.dropout, "position_embedding_type": "absolute",
            **hf_common(c, "BertForSequenceClassification" if c.id2label else "BertModel")}


def _from_roberta(hf: dict[str, Any]) -> dict[str, Any]:
    """BERT with positions counted from the padding index + 1 (the learned table keeps those first rows)."""
    out = _from_bert(hf) | dict(family="xlm-roberta" if hf.get("model_type") == "xlm-roberta" else "roberta")
    offset = (hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 1) + 1
    if out["context_length"] <= offset:
        raise ConfigError(f"field 'max_position_embeddings' = {out['context_length']} leaves no position after "
                          f"the padding offset {offset}")
    return out | dict(context_length=out["context_length"] - offset, position_offset=offset,
                      type_vocab_size=hf.get("type_vocab_size", 1))


def _to_roberta(c: Any) -> dict[str, Any]:
    require(c, c.family, position_offset=(c.pad_token_id if c.pad_token_id is not None else 1) + 1)
    stem = "XLMRoberta" if c.family == "xlm-roberta" else "Roberta"
    return _to_bert(c) | {"model_type": c.family, "max_position_embeddings": c.context_length + c.position_offset,
                          "architectures": [f"{stem}ForSequenceClassification" if c.id2label else f"{stem}Model"]}


def _from_distilbert(hf: dict[str, Any]) -> dict[str, Any]:
    """Post-norm encoder without token types; a classifier checkpoint's pre_classifier (dense + relu) is our
    pooler. sinusoidal_pos_embds only fills the stored position table, which is loaded as it is."""
    head = any("ForSequenceClassification" in a for a in hf.get("architectures") or [])
    return dict(family="distilbert", vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 512),
                d_model=hf["dim"], n_layers=hf["n_layers"], n_heads=hf["n_heads"], d_ff=hf["hidden_dim"],
                norm="layernorm", norm_eps=1e-12, norm_placement="post", final_norm=False, embed_norm=True,
                mlp="gelu", activation=act(hf.get("activation", "gelu")), attn_bias=True, mlp_bias=True,
                position="learned", causal=False, type_vocab_size=0, tie_embeddings=True, pooler=head,
                pooler_act="relu", **common_tokens(hf))


def _to_distilbert(c: Any) -> dict[str, Any]:
    require(c, "distilbert", norm="layernorm", norm_placement="post", type_vocab_size=0, pooler_act="relu")
    return {"model_type": "distilbert", "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
            "dim": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "hidden_dim": c.d_ff,
            "activation": HF_ACT[c.activation], "dropout": c.dropout, "attention_dropout": c.dropout,
            "sinusoidal_pos_embds": False,
            **hf_common(c, "DistilBertForSequenceClassification" if c.id2label else "DistilBertModel")}


def _from_modernbert(hf: dict[str, Any]) -> dict[str, Any]:
    """Pre-norm bidirectional encoder: embedding LayerNorm, no attention norm in layer 0, fused Wqkv and Wi (GeGLU),
    bias-free LayerNorms, rotary with a theta per layer type, and local layers that see |i - j| <= local_attention
    // 2. The head of every task checkpoint (dense -> act -> LayerNorm, `head.*`) is our pooler + pooler_norm; a
    bare ModernBertModel has none."""
    n = hf["num_hidden_layers"]
    every = hf.get("global_attn_every_n_layers", 3)  # the pre-layer_types spelling, still on the Hub
    types = layer_types(hf, n, lambda i: bool(i % every))
    thetas = {}
    for key, old, default in (("full_attention", "global_rope_theta", 160000.0),
                              ("sliding_attention", "local_rope_theta", 10000.0)):
        theta, scaling = rope(hf, key) if hf.get("rope_parameters") else (float(hf.get(old, default)), None)
        if scaling:
            raise ConfigError(f"field 'rope_parameters' = {short(scaling)} ({key}) is not implemented (default only)")
        thetas[key] = theta
    pooling = hf.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ConfigError(f"field 'classifier_pooling' = {pooling!r}: expected 'cls' or 'mean'")
    head = any(a != "ModernBertModel" for a in hf.get("architectures") or [])
    return dict(family="modernbert", vocab_size=hf["vocab_size"],
                context_length=hf.get("max_position_embeddings", 8192), d_model=hf["hidden_size"], n_layers=n,
                n_heads=hf["num_attention_heads"],
                d_ff=hf["intermediate_size"], norm="layernorm", norm_eps=hf.get("norm_eps", 1e-5),
                norm_bias=hf.get("norm_bias") or False, norm_placement="pre", final_norm=True,
                first_attn_norm=False, embed_norm=True, mlp="geglu",
                activation=act(hf.get("hidden_activation", "gelu")),
                attn_bias=hf.get("attention_bias") or False, mlp_bias=hf.get("mlp_bias") or False,
                position="rotary", rope_theta=thetas["full_attention"], rope_local_theta=thetas["sliding_attention"],
                causal=False, type_vocab_size=0, tie_embeddings=True,
                sliding_window=hf.get("local_attention", 128) // 2 + 1, layer_types=types, pooler=head,
                pooler_act=act(hf.get("classifier_activation", "gelu")),
                pooler_bias=hf.get("classifier_bias") or False, pooler_norm=True, pooling=pooling,
                **common_tokens(hf))


def _to_modernbert(c: Any) -> dict[str, Any]:
    require(c, "modernbert", norm="layernorm", norm_placement="pre", final_norm=True, first_attn_norm=False,
            embed_norm=True, mlp="geglu", position="rotary", causal=False, type_vocab_size=0, rotary_fraction=1.0,
            rope_scaling=None, pooler_norm=True)
    if c.pooling not in (None, "cls", "mean"):
        raise ConfigError(f"config field 'pooling' = {c.pooling!r}: ModernBERT's classifier pools by cls or mean")
    return {"model_type": "modernbert", "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "intermediate_size": c.d_ff, "hidden_activation": HF_ACT[c.activation], "norm_eps": c.norm_eps,
            "norm_bias": c.norm_bias, "attention_bias": c.attn_bias, "mlp_bias": c.mlp_bias,
            "layer_types": hf_layer_types(c),
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": c.rope_local_theta or c.rope_theta}},
            "local_attention": 2 * (c.sliding_window - 1) if c.sliding_window else 128,
            "classifier_pooling": c.pooling or "cls", "classifier_bias": c.pooler_bias,
            "classifier_activation": HF_ACT.get(c.pooler_act, c.pooler_act), "attention_dropout": c.dropout,
            "embedding_dropout": c.dropout, "mlp_dropout": c.dropout,
            **hf_common(c, "ModernBertForSequenceClassification" if c.id2label else "ModernBertModel")}


_BERT_READS = frozenset({"vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "layer_norm_eps", "hidden_act", "type_vocab_size",
                         "position_embedding_type", "tie_word_embeddings"})

ENCODERS: tuple[FamilySpec, ...] = (
    FamilySpec("bert", ("bert",), "encoder", _from_bert, _to_bert, _BERT_READS,
               inert=frozenset({"gradient_checkpointing"}), note="BERT-family encoders (MiniLM)"),
    FamilySpec("roberta", ("roberta",), "encoder", _from_roberta, _to_roberta, _BERT_READS,
               note="positions offset by the padding index"),
    FamilySpec("xlm-roberta", ("xlm-roberta",), "encoder", _from_roberta, _to_roberta, _BERT_READS,
               note="multilingual roberta"),
    FamilySpec("distilbert", ("distilbert",), "encoder", _from_distilbert, _to_distilbert,
               frozenset({"vocab_size", "max_position_embeddings", "dim", "n_layers", "n_heads", "hidden_dim",
                          "activation", "tie_word_embeddings"}),
               inert=frozenset({"dropout", "qa_dropout", "seq_classif_dropout", "sinusoidal_pos_embds"}),
               note="6-layer distilled BERT; pre_classifier + relu head"),
    FamilySpec("modernbert", ("modernbert",), "encoder", _from_modernbert, _to_modernbert,
               frozenset({"vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                          "num_attention_heads", "intermediate_size", "hidden_activation", "norm_eps", "norm_bias",
                          "attention_bias", "mlp_bias", "layer_types", "global_attn_every_n_layers",
                          "rope_parameters", "global_rope_theta", "local_rope_theta", "local_attention",
                          "classifier_pooling", "classifier_activation", "classifier_bias", "tie_word_embeddings"}),
               # decoder_bias / sparse_*: the masked-LM head, not loaded; layer_norm_eps and position_embedding_type
               # are in the Hub's configs but not read by transformers' ModernBERT either
               inert=frozenset({"embedding_dropout", "mlp_dropout", "initializer_cutoff_factor", "cls_token_id",
                                "decoder_bias", "sparse_prediction", "sparse_pred_ignore_index",
                                "deterministic_flash_attn", "reference_compile", "repad_logits_with_grad",
                                "layer_norm_eps", "position_embedding_type"}),
               note="rotary, alternating local / global attention, GeGLU; dense + act + LayerNorm head"),
)
