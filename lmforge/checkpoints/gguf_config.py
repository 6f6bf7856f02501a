"""GGUF metadata (`{arch}.*`, `tokenizer.ggml.*`) -> the Hugging Face config.json these weights correspond to.

Values the metadata omits take llama.cpp's defaults (its runtime defines the format); where transformers' GGUF
loader assumes something else, the comment says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoints.gguf_rope import llama3_parameters, longrope_parameters, tensor_values
from lmforge.errors import CheckpointError, ModelNotFoundError

_SMALL_ARRAY = 64  # metadata arrays up to this length are kept as lists, longer ones summarised


def open_gguf(path: Path):
    """The file's GGUFFile with our errors: missing -> ModelNotFoundError, not GGUF/truncated -> CheckpointError."""
    from lmforge.gguf_file import GGUFFile, GGUFFormatError

    if not path.exists():
        raise ModelNotFoundError(f"{path}: GGUF file not found")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: is not a file (expected a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFFile(path)
    except (GGUFFormatError, OSError) as e:
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:160]
        raise CheckpointError(f"{path}: unreadable GGUF file, truncated or corrupt "
                              f"({path.stat().st_size} bytes; {msg})") from None


def _value(f) -> Any:
    """A metadata field as a plain Python value (int, float, bool, str, or list of them)."""
    v = f.contents()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return [x.item() if isinstance(x, np.generic) else x for x in v]
    return v


def meta_opt(reader, key: str, default: Any = None) -> Any:
    """Metadata `key` as a plain value, or `default` when the file lacks it."""
    f = reader.fields.get(key)
    return default if f is None else _value(f)


def meta_get(reader, key: str, src: str) -> Any:
    """Metadata `key` as a plain value; a CheckpointError naming the file when it is missing."""
    f = reader.fields.get(key)
    if f is None:
        raise CheckpointError(f"{src}: GGUF metadata lacks required key {key!r}")
    return _value(f)


def _array_len(reader, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else f.count


def metadata_of(reader) -> dict[str, Any]:
    """Every key -> plain value; arrays longer than _SMALL_ARRAY (token lists, merges) summarised."""
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # file-format header (version, counts), not model metadata
        if f.types and f.types[0] == GGUFValueType.ARRAY and f.count > _SMALL_ARRAY:
            out[key] = f"<array of {f.count} {f.types[-1].name}>"
        else:
            out[key] = _value(f)
    return out


def file_type_name(ft: int | None) -> str | None:
    """general.file_type (llama.cpp's LlamaFileType) -> Q4_K_M, Q4_1, F16, ..."""
    from gguf import LlamaFileType

    if ft is None:
        return None
    try:
        name = LlamaFileType(int(ft)).name
    except ValueError:
        return f"type{ft}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _one(value: Any, key: str, src: str) -> Any:
    """Per-layer arrays (some GGUFs store head counts per layer) must be uniform for our config."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise CheckpointError(f"{src}: GGUF key {key!r} varies per layer ({value[:4]}...), not supported")
        return value[0]
    return value


# GGUF architecture -> the lmforge family its files load as (llama with experts: mixtral)
FAMILY_OF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe", "olmo2": "olmo2",
                  "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3", "gpt2": "gpt2"}
# `{arch}.*` keys read below; any other is refused with its name unless inert or at llama.cpp's default value
_BASE = frozenset({"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
                   "attention.head_count", "attention.head_count_kv", "attention.key_length",
                   "attention.value_length", "attention.layer_norm_rms_epsilon", "rope.dimension_count",
                   "rope.freq_base", "rope.scaling.type", "rope.scaling.factor"})
_GEMMA = _BASE | {"attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa",
                  "attn_logit_softcapping", "final_logit_softcapping"}
_EXPERTS = frozenset({"expert_count", "expert_used_count"})
_READS = {
    "llama": _BASE | _EXPERTS, "qwen2": _BASE, "qwen3": _BASE, "olmo2": _BASE, "gemma2": _GEMMA, "gemma3": _GEMMA,
    "qwen3moe": _BASE | _EXPERTS | {"expert_feed_forward_length"},
    "phi3": _BASE | {"rope.scaling.attn_factor", "rope.scaling.original_context_length", "attention.sliding_window"},
    "gpt2": frozenset({"context_length", "embedding_length", "block_count", "feed_forward_length",
                       "attention.head_count", "attention.layer_norm_epsilon"}),
}
# bookkeeping, and the original context length (read by yarn and longrope only, which are refused or read here)
_INERT = frozenset({"rope.scaling.finetuned", "rope.scaling.original_context_length"})
_DEFAULTS = {"attention.causal": True, "rope.scaling.attn_factor": 1.0, "expert_count": 0, "expert_used_count": 0}


def check_keys(reader, arch: str, src: str) -> None:
    """Refuse an `{arch}.*` key this loader neither reads nor knows to be inert: one that changes what llama.cpp
    computes is implemented or refused, never dropped."""
    for key in reader.fields:
        k = key.removeprefix(f"{arch}.")
        if k == key or k in _READS[arch] or k in _INERT:
            continue
        v = meta_opt(reader, key)
        if k in _DEFAULTS and v == _DEFAULTS[k]:
            continue
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise CheckpointError(f"{src}: GGUF key {key!r} = {shown} is not supported for architecture {arch!r} "
                              "(lmforge refuses it rather than compute something else)")


def hf_config(reader, arch: str, src: str, names: list[str], embd_rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """The HF config.json dict these weights correspond to, from `{arch}.*` and `tokenizer.ggml.*` keys."""
    a = arch
    check_keys(reader, arch, src)

    def req(k: str) -> Any:
        return _one(meta_get(reader, f"{a}.{k}", src), f"{a}.{k}", src)

    def opt(k: str, default: Any = None) -> Any:
        v = meta_opt(reader, f"{a}.{k}")
        return default if v is None else _one(v, f"{a}.{k}", src)

    d_model, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
    n_layers = int(req("block_count"))
    n_kv = int(opt("attention.head_count_kv", n_heads))
    # llama.cpp: head dim = key_length, default n_embd / n_head; transformers reads rope.dimension_count
    # for llama and key_length for the others. A rotary width below the head dim is Phi-3's partial rotary.
    head_dim = opt("attention.key_length")
    n_rot = opt("rope.dimension_count")
    if head_dim is None:
        head_dim = n_rot if (arch == "llama" and n_rot is not None) else d_model // n_heads
    head_dim = int(head_dim)
    n_rot = head_dim if n_rot is None else int(n_rot)
    if n_rot != head_dim and not (arch == "phi3" and 0 < n_rot < head_dim and n_rot % 2 == 0):
        raise CheckpointError(f"{src}: GGUF key '{a}.rope.dimension_count' = {n_rot} differs from the head "
                              f"dimension {head_dim} (partial rotary is not supported for {arch})")
    v_len = opt("attention.value_length")
    if v_len is not None and int(v_len) != head_dim:
        raise CheckpointError(f"{src}: GGUF key '{a}.attention.value_length' = {v_len} differs from "
                              f"'{a}.attention.key_length' = {head_dim}")

    # vocab: {arch}.vocab_size, else the token list (as transformers); must match the embedding rows
    vocab = opt("vocab_size") or _array_len(reader, "tokenizer.ggml.tokens") or embd_rows
    if int(vocab) != embd_rows:
        raise CheckpointError(f"{src}: GGUF vocabulary has {vocab} tokens but 'token_embd.weight' has "
                              f"{embd_rows} rows")

    eos: int | list[int] | None = meta_opt(reader, "tokenizer.ggml.eos_token_id")
    # llama.cpp also ends generation at end-of-turn / end-of-message tokens (transformers keeps eos only)
    extra_eos = [meta_opt(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    extra_eos = [e for e in extra_eos if e is not None and e != eos]
    if extra_eos:
        eos = ([eos] if eos is not None else []) + extra_eos
    tokens = {"bos_token_id": meta_opt(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
              "pad_token_id": meta_opt(reader, "tokenizer.ggml.padding_token_id"),
              "dtype": str(dtype).removeprefix("torch.")}

    if arch == "gpt2":  # llama.cpp's gpt2: LayerNorm, tanh GELU, learned positions, biases everywhere
        return {
            "model_type": "gpt2", "vocab_size": int(vocab), "n_positions": int(req("context_length")),
            "n_embd": d_model, "n_layer": n_layers, "n_head": n_heads, "n_inner": int(req("feed_forward_length")),
            "layer_norm_epsilon": float(req("attention.layer_norm_epsilon")), "activation_function": "gelu_new",
            "tie_word_embeddings": "output.weight" not in names, **tokens,
        }
    ctx = int(req("context_length"))
    hf: dict[str, Any] = {
        "model_type": "gemma3_text" if arch == "gemma3" else FAMILY_OF_ARCH[arch],
        "vocab_size": int(vocab),
        "max_position_embeddings": ctx,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": int(req("feed_forward_length")),
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        **tokens,
    }
    theta = float(opt("rope.freq_base", 10000.0))
    scaling = _rope_scaling(reader, arch, src, names, n_rot, ctx, theta, opt)
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    if arch in ("gemma2", "gemma3"):
        return hf | _gemma(reader, arch, n_layers, d_model // n_heads, head_dim, rope, theta, opt, src)
    hf |= {"hidden_act": "silu", "rope_parameters": rope}
    if arch in ("llama", "qwen3", "qwen3moe", "olmo2"):  # qwen2's q/k/v biases are fixed by its family
        hf["attention_bias"] = "blk.0.attn_q.bias" in names
    n_experts = int(opt("expert_count", 0))
    if arch == "llama" and n_experts:  # Mixtral (llama.cpp's llama with experts: softmax, top-k renormalised)
        hf |= {"model_type": "mixtral", "num_local_experts": n_experts,
               "num_experts_per_tok": int(req("expert_used_count"))}
    elif arch == "llama":
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in names
    elif arch == "qwen3moe":  # llama.cpp renormalises the top-k weights and has no dense layers
        hf |= {"num_experts": n_experts, "num_experts_per_tok": int(req("expert_used_count")),
               "moe_intermediate_size": int(req("expert_feed_forward_length")), "norm_topk_prob": True,
               "decoder_sparse_step": 1, "mlp_only_layers": []}
    elif arch == "phi3":
        # the window as the model defines it (transformers applies it; llama.cpp's phi3 ignores it for now)
        hf |= {"partial_rotary_factor": n_rot / head_dim, "sliding_window": int(opt("attention.sliding_window", 0))
               or None, "original_max_position_embeddings": opt("rope.scaling.original_context_length")}
    return hf


def _rope_scaling(reader, arch: str, src: str, names: list[str], n_rot: int, ctx: int, theta: float, opt
                  ) -> dict[str, Any] | None:
    """HF rope scaling (without rope_theta) from the keys (linear), `rope_freqs.weight` (llama3, llama only) or
    `rope_factors_*.weight` (longrope, phi3 only); None for none."""
    kind = opt("rope.scaling.type")
    scaling = None
    if kind not in (None, "none"):
        if kind != "linear" and not (kind == "longrope" and arch == "phi3"):
            raise CheckpointError(f"{src}: GGUF key '{arch}.rope.scaling.type' = {kind!r} is not supported "
                                  "(linear)")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(opt("rope.scaling.factor", 1.0))}
    freqs = tensor_values(reader, "rope_freqs.weight")
    if freqs is not None:  # llama 3.1+ bakes its rope scaling into per-frequency factors
        if arch != "llama" or scaling:
            raise CheckpointError(f"{src}: GGUF tensor 'rope_freqs.weight' with architecture {arch!r}"
                                  + (f" and rope scaling {kind!r}" if scaling else "") + " is not supported")
        scaling = llama3_parameters(freqs, n_rot, theta, src)
    if arch == "phi3":
        long = longrope_parameters(reader, n_rot, opt("rope.scaling.original_context_length"), ctx,
                                   opt("rope.scaling.attn_factor"), src)
        if long and scaling:
            raise CheckpointError(f"{src}: GGUF rope factors together with rope scaling {kind!r} are not supported")
        scaling = long or scaling
    elif any(n.startswith("rope_factors_") for n in names):
        raise CheckpointError(f"{src}: GGUF rope factors ('rope_factors_long.weight') are not supported for "
                              f"architecture {arch!r}")
    return scaling


def _gemma(reader, arch: str, n_layers: int, d_head_27b: int, head_dim: int, rope: dict[str, Any], theta: float,
           opt, src: str) -> dict[str, Any]:
    """Gemma 2 / 3 fields llama.cpp hard-codes where the GGUF says nothing. Sliding layers: the pattern key (a
    period, or one flag per layer), else every 2nd (gemma2) / 6th (gemma3) layer is global; gemma3 without a
    window key has none (newer llama.cpp), gemma2's window defaults to 4096. gemma2 soft-caps at 50 / 30 unless
    the keys say otherwise. The attention scale is 1/sqrt(head_dim), except for the 27B models (46 layers for
    gemma2, 62 for gemma3): 1/sqrt(d_model / n_heads); transformers instead keeps the config's
    query_pre_attn_scalar (256 by default), which agrees for every released size."""
    gemma3 = arch == "gemma3"
    window = opt("attention.sliding_window", None if gemma3 else 4096)
    window = int(window) if window else None
    sliding = _sliding_layers(meta_opt(reader, f"{arch}.attention.sliding_window_pattern"), n_layers,
                              6 if gemma3 else 2, arch, src)
    layer_types = ["sliding_attention" if window and s else "full_attention" for s in sliding]
    local = float(opt("rope.freq_base_swa", 10000.0 if gemma3 else theta))
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": window, "layer_types": layer_types,
        "query_pre_attn_scalar": d_head_27b if n_layers == (62 if gemma3 else 46) else head_dim,
        "final_logit_softcapping": opt("final_logit_softcapping", None if gemma3 else 30.0),
        "attn_logit_softcapping": opt("attn_logit_softcapping", None if gemma3 else 50.0),
    }
    if gemma3:
        out["rope_parameters"] = {"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    elif local != theta:
        raise CheckpointError(f"{src}: GGUF key 'gemma2.rope.freq_base_swa' = {local} differs from "
                              f"'gemma2.rope.freq_base' = {theta} (gemma2 has one rotary base)")
    else:
        out["rope_parameters"] = rope
    return out


def _sliding_layers(pattern: Any, n_layers: int, default: int, arch: str, src: str) -> list[bool]:
    """Which layers use the sliding window, from llama.cpp's `attention.sliding_window_pattern`: one flag per layer,
    or a period n (layer i slides unless i % n == n - 1; 0: every layer slides)."""
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise CheckpointError(f"{src}: GGUF key '{arch}.attention.sliding_window_pattern' has {len(pattern)} "
                                  f"flags for {n_layers} layers")
        return [bool(x) for x in pattern]
    n = default if pattern is None else int(pattern)
    return [n == 0 or i % n < n - 1 for i in range(n_layers)]
