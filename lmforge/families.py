"""The model families lmforge loads, as data: how each Hugging Face config.json maps onto ModelConfig's fields and
back, which of its keys are read, and which are known not to change the computation.

A family is one `FamilySpec` here plus a tensor-name table (checkpoints/hf.py), never a model class of its own.
A config.json key that is neither read nor known to be inert, and holds a value other than null / false / 0, is
refused with its name: a field that changes the computation is implemented or refused, never dropped.
Builders return ModelConfig keyword arguments (this module does not import config.py, which imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lmforge.errors import ConfigError

# Keys any transformers config.json may carry that do not change what the network computes: bookkeeping,
# generation defaults, tokenizer ids, training-only dropout, the attention backend, task-head labels.
COMMON_INERT = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "pruned_heads", "torchscript", "task_specific_params",
    "tf_legacy_loss", "use_bfloat16", "_name_or_path", "_attn_implementation", "_attn_implementation_autoset",
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "classifier_dropout", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "num_return_sequences", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "diversity_penalty", "encoder_no_repeat_ngram_size", "num_beam_groups", "typical_p", "output_scores",
    "return_dict_in_generate", "encoder_hidden_size", "pretraining_tp", "mlp_only_layers_dropout",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "use_return_dict", "label_smoothing",
    "chat_template", "is_composition", "keys_to_ignore_at_inference", "base_model_tp_plan", "base_model_pp_plan",
    "gradient_checkpointing", "auto_map", "default_theta",
})
_EMPTY = (None, False, 0, "", [], {})


@dataclass(frozen=True)
class FamilySpec:
    """One family: its ModelConfig name, the HF model_type values it reads, whether it decodes, the keys its
    builder reads and those of its own that are inert, and the two translations."""

    name: str
    hf_types: tuple[str, ...]
    kind: str  # "decoder" | "encoder"
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    to_hf: Callable[[Any], dict[str, Any]]
    reads: frozenset[str]
    inert: frozenset[str] = field(default_factory=frozenset)
    note: str = ""  # what `lmforge info --families` says of it

    def check_keys(self, hf: dict[str, Any]) -> None:
        """Refuse a key this family neither reads nor knows to be inert, unless it holds an empty value."""
        for k, v in hf.items():
            if k in self.reads or k in self.inert or k in COMMON_INERT or k.startswith(("_", "lmforge_")):
                continue  # lmforge_*: lmforge's own records (a classifier's pooling), read by the task that wrote them
            if isinstance(v, (bool, int, float, str, list, dict, type(None))) and v in _EMPTY:
                continue
            raise ConfigError(f"field {k!r} = {_short(v)} is not implemented for model_type {hf.get('model_type')!r}; "
                              "lmforge refuses it rather than compute something else")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- shared pieces ---------------------------------------------------------------------------------------
def common_tokens(hf: dict[str, Any]) -> dict[str, Any]:
    id2label = hf.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise ConfigError(f"field 'id2label': expected an object, got {_short(id2label)}")
    # HF writes a default {0: LABEL_0, 1: LABEL_1} even for LMs; only keep labels a task set.
    if id2label and all(str(v) == f"LABEL_{k}" for k, v in id2label.items()) and not hf.get("finetuning_task"):
        if not any("ForSequenceClassification" in a for a in hf.get("architectures") or []):
            id2label = None
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"), id2label=id2label,
                dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"))


def act(name: str) -> str:
    return {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "silu": "silu", "swish": "silu", "relu": "relu"}.get(name, name)


HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}


def rope(hf: dict[str, Any], key: str | None = None) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    rp = hf.get("rope_parameters")
    if rp and key is not None and key in rp:
        rp = rp[key]
    if rp and "rope_theta" in rp:
        theta = float(rp["rope_theta"])
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"field 'rope_scaling': expected an object, got {_short(scaling)}")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def hf_rope(c: Any) -> dict[str, Any]:
    return {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}


def layer_types(hf: dict[str, Any], n: int, default: Callable[[int], bool]) -> list[str]:
    """Per layer "sliding" | "full": config.json's `layer_types` when present, else `default(i)` (True = sliding)."""
    lt = hf.get("layer_types")
    if lt is None:
        return ["sliding" if default(i) else "full" for i in range(n)]
    if not isinstance(lt, list) or any(t not in ("sliding_attention", "full_attention") for t in lt):
        raise ConfigError(f"field 'layer_types': expected a list of 'sliding_attention' | 'full_attention', "
                          f"got {_short(lt)}")
    return ["sliding" if t == "sliding_attention" else "full" for t in lt]


def hf_layer_types(c: Any) -> list[str]:
    return ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.n_layers)]


def hf_common(c: Any, arch: str) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": [arch], "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                           "pad_token_id": c.pad_token_id, "dtype": c.dtype, "tie_word_embeddings": c.tie_embeddings}
    if c.id2label:
        out["id2label"] = {str(k): v for k, v in c.id2label.items()}
        out["label2id"] = {v: k for k, v in c.id2label.items()}
    return out


def require(c: Any, family: str, **fixed: Any) -> None:
    """to_hf of a family whose HF class hard-codes these variant fields: refuse a config that differs."""
    for k, v in fixed.items():
        if getattr(c, k) != v:
            raise ConfigError(f"config field {k!r} = {getattr(c, k)!r}: the {family} format fixes it to {v!r}")


def int_if_close(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-3 else x


def arch(c: Any, stem: str) -> str:
    return f"{stem}ForSequenceClassification" if c.id2label else f"{stem}ForCausalLM"


# ---- decoders --------------------------------------------------------------------------------------------
_DECODER_READS = frozenset({
    "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "hidden_act", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings",
})


def decoder_base(hf: dict[str, Any], family: str, default_ctx: int = 2048) -> dict[str, Any]:
    """The fields every Llama-like decoder shares (RMSNorm, SwiGLU, rotary, grouped-query attention)."""
    theta, scaling = rope(hf)
    return dict(
        family=family, vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", default_ctx),
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        activation=act(hf.get("hidden_act", "silu")), position="rotary", rope_theta=theta, rope_scaling=scaling,
        causal=True, tie_embeddings=hf.get("tie_word_embeddings", False), **common_tokens(hf))


def hf_decoder_base(c: Any, model_type: str, stem: str) -> dict[str, Any]:
    return {"model_type": model_type, "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.d_ff,
            "rms_norm_eps": c.norm_eps, "hidden_act": HF_ACT[c.activation], "rope_parameters": hf_rope(c),
            "attention_dropout": c.dropout, **hf_common(c, arch(c, stem))}


def windowed(hf: dict[str, Any], n: int, *, all_layers: bool) -> dict[str, Any]:
    """sliding_window + layer_types of Mistral / Phi-3 (every layer when a window is set) and Qwen2/3 (layers from
    max_window_layers on, and only with use_sliding_window)."""
    sw = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        sw = None
    if sw is None:
        return dict(sliding_window=None, layer_types=None)
    start = 0 if all_layers else hf.get("max_window_layers", 0)
    return dict(sliding_window=sw, layer_types=layer_types(hf, n, lambda i: i >= start))


def _from_llama(hf: dict[str, Any]) -> dict[str, Any]:
    return decoder_base(hf, "llama") | dict(attn_bias=hf.get("attention_bias", False),
                                            mlp_bias=hf.get("mlp_bias", False))


def _to_llama(c: Any) -> dict[str, Any]:
    require(c, "llama", norm_placement="pre", qk_norm=False, sliding_window=None, attn_out_bias=None)
    return hf_decoder_base(c, "llama", "Llama") | {"attention_bias": c.attn_bias, "mlp_bias": c.mlp_bias,
                                                   "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling}


def _from_mistral(hf: dict[str, Any]) -> dict[str, Any]:
    return decoder_base(hf, "mistral", 32768) | windowed(hf, hf["num_hidden_layers"], all_layers=True)


def _to_mistral(c: Any) -> dict[str, Any]:
    require(c, "mistral", attn_bias=False, mlp_bias=False, qk_norm=False, norm_placement="pre")
    return hf_decoder_base(c, "mistral", "Mistral") | {"sliding_window": c.sliding_window}


def _from_qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    return decoder_base(hf, "qwen2", 32768) | windowed(hf, hf["num_hidden_layers"], all_layers=False) | dict(
        attn_bias=True, attn_out_bias=False)  # Qwen2: q/k/v biases, none on o (fixed by its HF class)


def _qwen_window(c: Any) -> dict[str, Any]:
    sliding = [i for i in range(c.n_layers) if c.is_sliding(i)]
    return {"use_sliding_window": bool(sliding), "sliding_window": c.sliding_window,
            "max_window_layers": sliding[0] if sliding else c.n_layers, "layer_types": hf_layer_types(c)}


def _to_qwen2(c: Any) -> dict[str, Any]:
    require(c, "qwen2", attn_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False)
    return hf_decoder_base(c, "qwen2", "Qwen2") | _qwen_window(c)


def _from_qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    return decoder_base(hf, "qwen3", 32768) | windowed(hf, hf["num_hidden_layers"], all_layers=False) | dict(
        attn_bias=hf.get("attention_bias", False), qk_norm=True)  # per-head RMSNorm on q and k


def _to_qwen3(c: Any) -> dict[str, Any]:
    require(c, "qwen3", qk_norm=True, qk_norm_scope="head", mlp_bias=False, attn_out_bias=None)
    return hf_decoder_base(c, "qwen3", "Qwen3") | _qwen_window(c) | {"attention_bias": c.attn_bias}


def _experts(hf: dict[str, Any]) -> int:
    n = hf.get("num_local_experts", hf.get("num_experts"))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"field 'num_local_experts': expected an integer >= 1, got {_short(n)}")
    return n


def _from_qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = sorted({*hf.get("mlp_only_layers", []), *(i for i in range(n) if (i + 1) % step)})
    return _from_qwen3(hf) | dict(family="qwen3_moe", n_experts=_experts(hf),
                                  n_experts_active=hf["num_experts_per_tok"], expert_d_ff=hf["moe_intermediate_size"],
                                  moe_norm_topk=hf.get("norm_topk_prob", False), dense_layers=dense or None)


def _to_qwen3_moe(c: Any) -> dict[str, Any]:
    out = _to_qwen3(c) | {"model_type": "qwen3_moe", "num_experts": c.n_experts,
                          "num_experts_per_tok": c.n_experts_active, "moe_intermediate_size": c.expert_d_ff or c.d_ff,
                          "norm_topk_prob": c.moe_norm_topk, "decoder_sparse_step": 1,
                          "mlp_only_layers": list(c.dense_layers or [])}
    out["architectures"] = [arch(c, "Qwen3Moe")]
    return out


def _from_mixtral(hf: dict[str, Any]) -> dict[str, Any]:
    return _from_mistral(hf) | dict(family="mixtral", n_experts=_experts(hf),
                                    n_experts_active=hf["num_experts_per_tok"], moe_norm_topk=True)


def _to_mixtral(c: Any) -> dict[str, Any]:
    require(c, "mixtral", moe_norm_topk=True, dense_layers=None, expert_d_ff=None)
    out = _to_mistral(c) | {"model_type": "mixtral", "num_local_experts": c.n_experts,
                            "num_experts_per_tok": c.n_experts_active}
    out["architectures"] = [arch(c, "Mixtral")]
    return out


def _from_olmo2(hf: dict[str, Any]) -> dict[str, Any]:
    return decoder_base(hf, "olmo2", 2048) | dict(
        attn_bias=hf.get("attention_bias", False), norm_placement="output", qk_norm=True, qk_norm_scope="all")


def _to_olmo2(c: Any) -> dict[str, Any]:
    require(c, "olmo2", norm_placement="output", qk_norm=True, qk_norm_scope="all", mlp_bias=False)
    return hf_decoder_base(c, "olmo2", "Olmo2") | {"attention_bias": c.attn_bias}


def _from_phi3(hf: dict[str, Any]) -> dict[str, Any]:
    out = decoder_base(hf, "phi3", 4096) | windowed(hf, hf["num_hidden_layers"], all_layers=True)
    out["rotary_fraction"] = float(hf.get("partial_rotary_factor", 1.0))
    scaling = out["rope_scaling"]
    if scaling is not None:  # longrope/su need the original context length, kept at the top level by Phi-3
        kind = scaling.get("rope_type", scaling.get("type"))
        out["rope_scaling"] = {"original_max_position_embeddings": hf.get("original_max_position_embeddings"),
                               "max_position_embeddings": out["context_length"], **scaling,
                               "rope_type": "longrope" if kind == "su" else kind}
    return out


def _to_phi3(c: Any) -> dict[str, Any]:
    require(c, "phi3", attn_bias=False, mlp_bias=False, qk_norm=False, norm_placement="pre")
    out = hf_decoder_base(c, "phi3", "Phi3") | {"sliding_window": c.sliding_window,
                                                "partial_rotary_factor": c.rotary_fraction}
    sc = dict(c.rope_scaling or {})
    if sc:
        out["original_max_position_embeddings"] = sc.pop("original_max_position_embeddings", None)
        sc.pop("max_position_embeddings", None)
        out["rope_parameters"] = {**sc, "rope_theta": c.rope_theta}
    return out


def _from_gemma(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """Gemma 2 and 3: sandwich norms stored as w-1, GeGLU, sqrt(d)-scaled embeddings, soft-capping, sliding
    windows on some layers (Gemma 3 also: per-head q/k norms and a local rotary theta)."""
    n_layers = hf["num_hidden_layers"]
    gemma3 = family == "gemma3"
    pattern = hf.get("sliding_window_pattern", 6 if gemma3 else 2)
    lt = layer_types(hf, n_layers, lambda i: bool((i + 1) % pattern))
    theta, scaling = rope(hf, "full_attention")
    local_theta = None
    if gemma3:
        local_theta, _ = rope(hf, "sliding_attention")
        if "rope_local_base_freq" in hf:
            local_theta = float(hf["rope_local_base_freq"])
        if "rope_parameters" not in hf and "rope_theta" not in hf:
            theta = 1_000_000.0
    d = hf["hidden_size"]
    head_dim = hf.get("head_dim", 256)
    return dict(
        family=family, vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 32768 if gemma3 else 8192),
        d_model=d, n_layers=n_layers, n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=head_dim, d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_offset=1.0, norm_placement="sandwich", mlp="geglu",
        activation=act(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
        attn_bias=hf.get("attention_bias", False), position="rotary", rope_theta=theta, rope_scaling=scaling,
        rope_local_theta=local_theta, causal=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        qk_norm=gemma3, sliding_window=hf.get("sliding_window"), layer_types=lt, embed_scale=math.sqrt(d),
        attn_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5, attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"), **common_tokens(hf))


def _to_gemma(c: Any, family: str) -> dict[str, Any]:
    gemma3 = family == "gemma3"
    require(c, family, norm_placement="sandwich", qk_norm=gemma3, mlp="geglu", norm_offset=1.0)
    assert c.head_dim is not None
    scale = c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5
    out = {"model_type": "gemma3_text" if gemma3 else "gemma2", "vocab_size": c.vocab_size,
           "max_position_embeddings": c.context_length, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
           "intermediate_size": c.d_ff, "rms_norm_eps": c.norm_eps, "hidden_activation": HF_ACT[c.activation],
           "attention_bias": c.attn_bias, "sliding_window": c.sliding_window,
           "layer_types": ["sliding_attention" if (c.layer_types or [])[i:i + 1] == ["sliding"] else "full_attention"
                           for i in range(c.n_layers)],
           "query_pre_attn_scalar": int_if_close(scale ** -2), "attn_logit_softcapping": c.attn_softcap,
           "final_logit_softcapping": c.final_softcap, **hf_common(c, arch(c, "Gemma3" if gemma3 else "Gemma2"))}
    if gemma3:
        out["rope_parameters"] = {"full_attention": hf_rope(c), "sliding_attention": {
            "rope_type": "default", "rope_theta": c.rope_local_theta or 10000.0}}
        out["use_bidirectional_attention"] = not c.causal
    else:
        out["rope_parameters"] = hf_rope(c)
    return out


# ---- encoders and GPT-2 ----------------------------------------------------------------------------------
def _from_gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("scale_attn_weights", True) is not True:
        raise ConfigError("field 'scale_attn_weights' = false is not implemented for model_type 'gpt2'")
    d = hf["n_embd"]
    return dict(family="gpt2", vocab_size=hf["vocab_size"], context_length=hf["n_positions"], d_model=d,
                n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_placement="pre", mlp="gelu",
                activation=act(hf.get("activation_function", "gelu_new")), attn_bias=True, mlp_bias=True,
                position="learned", causal=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                **common_tokens(hf))


def _to_gpt2(c: Any) -> dict[str, Any]:
    return {"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_embd": c.d_model,
            "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.d_ff, "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new" if c.activation == "gelu_tanh" else HF_ACT[c.activation],
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            **hf_common(c, "GPT2ForSequenceClassification" if c.id2label else "GPT2LMHeadModel")}


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


_WINDOW = frozenset({"sliding_window", "layer_types"})
_BERT_READS = frozenset({"vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "layer_norm_eps", "hidden_act", "type_vocab_size",
                         "position_embedding_type", "tie_word_embeddings"})
_QWEN = _WINDOW | {"use_sliding_window", "max_window_layers"}
_GEMMA = frozenset({"attention_bias", "sliding_window", "layer_types", "sliding_window_pattern",
                    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                    "hidden_activation", "rope_local_base_freq", "use_bidirectional_attention"})

SPECS: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",), "decoder", _from_llama, _to_llama,
               _DECODER_READS | {"attention_bias", "mlp_bias"}, note="Llama 2/3.x (llama3 rope scaling), SmolLM2"),
    FamilySpec("mistral", ("mistral",), "decoder", _from_mistral, _to_mistral, _DECODER_READS | _WINDOW,
               note="sliding-window attention when the config sets a window"),
    FamilySpec("qwen2", ("qwen2",), "decoder", _from_qwen2, _to_qwen2, _DECODER_READS | _QWEN,
               note="Qwen2 / Qwen2.5: q/k/v biases"),
    FamilySpec("qwen3", ("qwen3",), "decoder", _from_qwen3, _to_qwen3, _DECODER_READS | _QWEN | {"attention_bias"},
               note="per-head q/k RMSNorm"),
    FamilySpec("qwen3_moe", ("qwen3_moe",), "decoder", _from_qwen3_moe, _to_qwen3_moe,
               _DECODER_READS | _QWEN | {"attention_bias", "num_experts", "num_local_experts", "num_experts_per_tok",
                                         "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                                         "mlp_only_layers"},
               note="mixture of experts (top-k router, per-expert SwiGLU), qwen3 attention"),
    FamilySpec("mixtral", ("mixtral",), "decoder", _from_mixtral, _to_mixtral,
               _DECODER_READS | _WINDOW | {"num_local_experts", "num_experts_per_tok"},
               note="mixture of experts (top-2 router), mistral attention"),
    FamilySpec("olmo2", ("olmo2",), "decoder", _from_olmo2, _to_olmo2, _DECODER_READS | {"attention_bias"},
               note="norms after attention and MLP; q/k norm over the whole projection"),
    FamilySpec("phi3", ("phi3",), "decoder", _from_phi3, _to_phi3,
               _DECODER_READS | _WINDOW | {"partial_rotary_factor", "original_max_position_embeddings"},
               inert=frozenset({"embd_pdrop"}), note="fused qkv_proj and gate_up_proj; longrope scaling"),
    FamilySpec("gemma2", ("gemma2",), "decoder", lambda hf: _from_gemma(hf, "gemma2"),
               lambda c: _to_gemma(c, "gemma2"), _DECODER_READS | _GEMMA,
               note="soft-capping, alternating sliding windows"),
    FamilySpec("gemma3", ("gemma3_text", "gemma3"), "decoder", lambda hf: _from_gemma(hf, "gemma3"),
               lambda c: _to_gemma(c, "gemma3"), _DECODER_READS | _GEMMA,
               inert=frozenset({"text_config", "vision_config", "mm_tokens_per_image", "boi_token_index",
                                "eoi_token_index", "image_token_index"}),
               note="text part; q/k norms, local and global rotary"),
    FamilySpec("gpt2", ("gpt2",), "decoder", _from_gpt2, _to_gpt2,
               frozenset({"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                          "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "scale_attn_weights"}),
               inert=frozenset({"n_ctx"}), note="learned positions, fused c_attn"),
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
)
BY_NAME = MappingProxyType({s.name: s for s in SPECS})
BY_HF_TYPE = MappingProxyType({t: s for s in SPECS for t in s.hf_types})
