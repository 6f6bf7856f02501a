"""ModelConfig: one dataclass whose fields select the variant of every part of the Transformer.

Every family (GPT-2, Llama, Mistral, Qwen2/3, OLMo 2, Phi-3, Gemma 2/3, BERT) is a point in this space; `from_hf`
and `to_hf` translate to and from a Hugging Face `config.json` through lmforge/families/, so checkpoints travel
both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge import families
from lmforge.errors import ConfigError

Family = Literal["gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "phi3", "gemma2",
                 "gemma3", "bert", "roberta", "xlm-roberta", "distilbert", "modernbert"]
PoolerAct = Literal["tanh", "relu", "gelu", "gelu_tanh", "silu"]
Pooling = Literal["last", "cls", "mean"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post", "sandwich", "output"]
QkNormScope = Literal["head", "all"]
MlpKind = Literal["gelu", "swiglu", "geglu"]
Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]
Position = Literal["learned", "sinusoidal", "rotary", "none"]
LayerType = Literal["full", "sliding"]
FAMILIES: tuple[str, ...] = typing.get_args(Family)

# Range rules checked after the type checks: field -> (lowest allowed, whether the bound itself is allowed).
_AT_LEAST_1 = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
               "sliding_window", "expert_d_ff")
_POSITIVE = ("norm_eps", "rope_theta", "rope_local_theta", "embed_scale", "attn_scale", "attn_softcap",
             "final_softcap")
_AT_LEAST_0 = ("type_vocab_size", "bos_token_id", "pad_token_id", "n_experts", "n_experts_active", "position_offset")


@dataclass
class ModelConfig:
    family: Family = "llama"  # the HF model_type we map to and from (lmforge/families/)
    vocab_size: int = 32000
    context_length: int = 2048  # max positions the model was trained for
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 2048  # MLP hidden width

    # variants
    norm: Norm = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # gemma stores RMSNorm weight as w-1: y = x * (offset + w)
    norm_bias: bool = True  # LayerNorms have a bias (modernbert's have none)
    # pre (gpt2, llama) | post: after the residual add (bert) | sandwich: before and on the output (gemma) |
    # output: on the attention / MLP output before the residual add, none before (olmo2)
    norm_placement: NormPlacement = "pre"
    final_norm: bool = True  # a norm after the last block (not in bert)
    first_attn_norm: bool = True  # layer 0 normalises its attention input (modernbert: no, its embeddings are)
    embed_norm: bool = False  # LayerNorm after the embeddings (bert)
    mlp: MlpKind = "swiglu"  # gelu (fc1 -> act -> fc2) | swiglu | geglu (gate * up -> down)
    activation: Activation = "silu"  # gelu (exact) | gelu_tanh | silu | relu
    attn_bias: bool = False
    attn_out_bias: bool | None = None  # None = attn_bias
    mlp_bias: bool = False
    position: Position = "rotary"  # learned | sinusoidal | rotary | none
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters for global layers (linear, llama3, ...)
    rope_local_theta: float | None = None  # gemma3: theta of sliding-window layers
    rotary_fraction: float = 1.0
    causal: bool = True
    type_vocab_size: int = 0  # token-type (segment) embeddings, bert
    position_offset: int = 0  # learned positions start here (roberta: padding index + 1)
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm on queries and keys (gemma3, qwen3, olmo2)
    qk_norm_scope: QkNormScope = "head"  # head: over each head's dims | all: over the whole projection (olmo2)
    sliding_window: int | None = None  # causal: q - k < W; bidirectional (causal False): |q - k| < W
    layer_types: list[LayerType] | None = None  # per layer: "full" | "sliding"
    embed_scale: float | None = None  # multiply token embeddings (gemma: sqrt(d_model))
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    pooler: bool = False  # bert pooler (dense + tanh on [CLS]); distilbert's pre_classifier (dense + relu)
    pooler_act: PoolerAct = "tanh"
    pooler_bias: bool = True  # the pooler's dense layer has a bias (modernbert's classifier_bias)
    pooler_norm: bool = False  # a LayerNorm after the pooler's activation (modernbert's prediction head)
    pooling: Pooling | None = None  # the classifier's pooling the checkpoint names (modernbert); None = task default
    # mixture of experts (mixtral, qwen3_moe): 0 experts = a dense MLP in every layer
    n_experts: int = 0
    n_experts_active: int = 0  # top-k experts per token
    expert_d_ff: int | None = None  # an expert's hidden width; None = d_ff
    moe_norm_topk: bool = True  # renormalise the top-k router probabilities to sum to 1
    dense_layers: list[int] | None = None  # layers that keep the dense MLP (d_ff) in a mixture model

    # special tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # task head metadata (classification)
    id2label: dict[int, str] | None = None
    dropout: float = 0.0
    dtype: str = "float32"  # dtype the weights were stored in

    def __post_init__(self) -> None:
        """Check every field's type (Literal variants included) and range, so a bad config fails here, by
        name, and not as a shape error deep inside a forward pass."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), _field_types()[f.name]))
        for name in _AT_LEAST_1:
            _at_least(name, getattr(self, name), 1)
        for name in _AT_LEAST_0:
            _at_least(name, getattr(self, name), 0)
        for name in _POSITIVE:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"config field {name!r}: must be > 0, got {v}")
        for e in self.eos_ids:
            _at_least("eos_token_id", e, 0)
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ConfigError(f"config field 'rotary_fraction': must be in (0, 1], got {self.rotary_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'dropout': must be in [0, 1), got {self.dropout}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_experts and not 1 <= self.n_experts_active <= self.n_experts:
            raise ConfigError(f"config field 'n_experts_active': must be in 1..n_experts={self.n_experts}, "
                              f"got {self.n_experts_active}")
        if any(not 0 <= i < self.n_layers for i in self.dense_layers or []):
            raise ConfigError(f"config field 'dense_layers': layer indices must be in 0..{self.n_layers - 1}")
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ConfigError(f"config field 'layer_types' has {len(self.layer_types)} entries for "
                              f"{self.n_layers} layers")
        if self.id2label is not None:
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except ValueError:
                raise ConfigError(f"config field 'id2label': keys must be integers, got {list(self.id2label)}") \
                    from None

    # ---- derived -------------------------------------------------------------------------------
    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 0

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and layer not in (self.dense_layers or [])

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and self.layer_types is not None and self.layer_types[layer] == "sliding"

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected an object, got {_short(d)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"config: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict of a family in lmforge/families/; a key that changes the
        computation and is not implemented is refused by name."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got a JSON {type(hf).__name__}")
        mt = hf.get("model_type")
        spec = families.BY_HF_TYPE.get(mt) if isinstance(mt, str) else None
        if spec is None:
            raise ConfigError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(families.BY_HF_TYPE)};"
                              " `lmforge info --families` lists them)")
        if mt == "gemma3":
            hf = hf.get("text_config", hf)
            if not isinstance(hf, dict):
                raise ConfigError(f"{source}: field 'text_config': expected an object, got {_short(hf)}")
        try:
            _check_hf_numbers(hf)
            spec.check_keys(hf)
            return cls(**spec.from_hf(hf))
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r} for model_type {mt!r}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a nested value (rope_parameters, ...) of a wrong type
            raise ConfigError(f"{source}: malformed config for model_type {mt!r} ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json that transformers' Auto classes load for this model."""
        return families.BY_NAME[self.family].to_hf(self)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise ConfigError(f"{p}: JSON nested too deeply") from None
        if isinstance(d, dict) and "family" in d:
            try:
                return cls.from_dict(d)
            except ConfigError as e:
                raise ConfigError(f"{p}: {e}") from None
        return cls.from_hf(d, source=str(p))


# ---- field validation ------------------------------------------------------------------------------
@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ModelConfig)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + " | ".join(typing.get_args(tp))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "an object"}
    return names.get(typing.get_origin(tp) or tp, str(tp))


def _checked(name: str, v: Any, tp: Any) -> Any:
    """`v` if it has the annotated type `tp` (a float field takes an int and returns it as float), else a
    ConfigError naming the field. bool is not accepted as int: JSON `true` for a head count is a mistake."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options:
            try:
                return _checked(name, v, a)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise ConfigError(f"config field {name!r}: expected {' or '.join(map(_describe, options))}, "
                          f"got {_short(v)}")
    ok = {
        Literal: lambda: isinstance(v, str) and v in args,
        int: lambda: isinstance(v, int) and not isinstance(v, bool),
        float: lambda: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        bool: lambda: isinstance(v, bool),
        str: lambda: isinstance(v, str),
        list: lambda: isinstance(v, list),
        dict: lambda: isinstance(v, dict),
    }.get(origin or tp, lambda: True)
    if not ok():
        what = "a finite number" if tp is float else _describe(tp)
        raise ConfigError(f"config field {name!r}: expected {what}, got {_short(v)}")
    if tp is float:
        return float(v)
    if origin is list and args:
        return [_checked(name, x, args[0]) for x in v]
    return v


def _at_least(name: str, v: int | None, low: int) -> None:
    if v is not None and v < low:
        raise ConfigError(f"config field {name!r}: must be >= {low}, got {v}")


# HF config keys whose values we read as numbers: checked by their own names before any arithmetic on them.
_HF_COUNTS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "max_position_embeddings",
              "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "sliding_window", "sliding_window_pattern", "local_attention",
              "global_attn_every_n_layers")
_HF_POSITIVE = ("layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps", "norm_eps", "global_rope_theta",
                "local_rope_theta", "rope_theta", "rope_local_base_freq",
                "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


def _check_hf_numbers(hf: dict[str, Any]) -> None:
    """Type and range of the numeric HF fields, named as the file names them (num_attention_heads, not n_heads)."""
    for key in _HF_COUNTS:
        v = hf.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"field {key!r}: expected an integer, got {_short(v)}")
        if v < 1:
            raise ConfigError(f"field {key!r}: must be >= 1, got {v}")
    for key in _HF_POSITIVE:
        v = hf.get(key)
        if v is None:
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"field {key!r}: expected a finite number, got {_short(v)}")
        if v <= 0:
            raise ConfigError(f"field {key!r}: must be > 0, got {v}")


# ---- named presets, for pretraining from scratch -------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(family="gpt2", vocab_size=8192, context_length=256, d_model=256, n_layers=4, n_heads=4,
                      d_ff=1024, norm="layernorm", mlp="gelu", activation="gelu_tanh", attn_bias=True,
                      mlp_bias=True, position="learned"),
    "gpt2-small": dict(family="gpt2", vocab_size=50257, context_length=1024, d_model=768, n_layers=12,
                       n_heads=12, d_ff=3072, norm="layernorm", mlp="gelu", activation="gelu_tanh",
                       attn_bias=True, mlp_bias=True, position="learned"),
    "llama-tiny": dict(family="llama", vocab_size=8192, context_length=256, d_model=256, n_layers=4,
                       n_heads=4, n_kv_heads=2, d_ff=688, norm="rmsnorm", mlp="swiglu", activation="silu",
                       position="rotary", tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model config preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})
