"""Decoder families: Llama-like (llama, mistral, qwen2, qwen3, olmo2, phi3), the mixtures (qwen3_moe, mixtral),
Gemma 2/3 and GPT-2; each a config.json <-> ModelConfig translation and a FamilySpec."""

from __future__ import annotations

import math
from typing import Any

from lmforge.errors import ConfigError
from lmforge.families.spec import (
    HF_ACT,
    FamilySpec,
    act,
    arch,
    common_tokens,
    hf_common,
    hf_layer_types,
    hf_rope,
    int_if_close,
    layer_types,
    require,
    rope,
    short,
)

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
        raise ConfigError(f"field 'num_local_experts': expected an integer >= 1, got {short(n)}")
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



# ---- GPT-2 ---------------------------------------------------------------------------------------------
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


_WINDOW = frozenset({"sliding_window", "layer_types"})
_QWEN = _WINDOW | {"use_sliding_window", "max_window_layers"}
_GEMMA = frozenset({"attention_bias", "sliding_window", "layer_types", "sliding_window_pattern",
                    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                    "hidden_activation", "rope_local_base_freq", "use_bidirectional_attention"})

DECODERS: tuple[FamilySpec, ...] = (
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
)
