"""What every family entry shares: the FamilySpec record, the keys any config.json may carry without changing the
computation, and the small translations (rope parameters, layer types, token ids) the families reuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import ConfigError

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
            raise ConfigError(f"field {k!r} = {short(v)} is not implemented for model_type {hf.get('model_type')!r}; "
                              "lmforge refuses it rather than compute something else")


def short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- shared pieces ---------------------------------------------------------------------------------------
def common_tokens(hf: dict[str, Any]) -> dict[str, Any]:
    id2label = hf.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise ConfigError(f"field 'id2label': expected an object, got {short(id2label)}")
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
        raise ConfigError(f"field 'rope_scaling': expected an object, got {short(scaling)}")
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
                          f"got {short(lt)}")
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
