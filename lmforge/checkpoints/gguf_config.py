"""GGUF metadata (`{arch}.*`, `tokenizer.ggml.*`) -> the Hugging Face config.json these weights correspond to.

Values the metadata omits take llama.cpp's defaults (its runtime defines the format); where transformers' GGUF
loader assumes something else, the comment says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def hf_config(reader, arch: str, src: str, names: list[str], embd_rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """The HF config.json dict these weights correspond to, from `{arch}.*` and `tokenizer.ggml.*` keys."""
    a = arch

    def req(k: str) -> Any:
        return _one(meta_get(reader, f"{a}.{k}", src), f"{a}.{k}", src)

    def opt(k: str, default: Any = None) -> Any:
        v = meta_opt(reader, f"{a}.{k}")
        return default if v is None else _one(v, f"{a}.{k}", src)

    d_model, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
    n_layers = int(req("block_count"))
    n_kv = int(opt("attention.head_count_kv", n_heads))
    # llama.cpp: head dim = key_length, default n_embd / n_head; transformers reads rope.dimension_count
    # for llama and key_length for gemma3. A rotary width different from the head dim is not llama/gemma.
    head_dim = opt("attention.key_length")
    n_rot = opt("rope.dimension_count")
    if head_dim is None:
        head_dim = n_rot if (arch == "llama" and n_rot is not None) else d_model // n_heads
    head_dim = int(head_dim)
    if n_rot is not None and int(n_rot) != head_dim:
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

    if arch == "gpt2":  # llama.cpp's gpt2: LayerNorm, tanh GELU, learned positions, biases everywhere
        return {
            "model_type": "gpt2", "vocab_size": int(vocab), "n_positions": int(req("context_length")),
            "n_embd": d_model, "n_layer": n_layers, "n_head": n_heads, "n_inner": int(req("feed_forward_length")),
            "layer_norm_epsilon": float(req("attention.layer_norm_epsilon")), "activation_function": "gelu_new",
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": meta_opt(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
            "pad_token_id": meta_opt(reader, "tokenizer.ggml.padding_token_id"),
            "dtype": str(dtype).removeprefix("torch."),
        }
    hf: dict[str, Any] = {
        "model_type": "llama" if arch == "llama" else "gemma3_text",
        "vocab_size": int(vocab),
        "max_position_embeddings": int(req("context_length")),
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": int(req("feed_forward_length")),
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "bos_token_id": meta_opt(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta_opt(reader, "tokenizer.ggml.padding_token_id"),
        "dtype": str(dtype).removeprefix("torch."),
    }
    # rope: llama.cpp's default base is 10000; linear scaling is the only kind these two archs write as keys
    theta = float(opt("rope.freq_base", 10000.0))
    scaling = None
    kind = opt("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise CheckpointError(f"{src}: GGUF key '{a}.rope.scaling.type' = {kind!r} is not supported (linear)")
        scaling = {"rope_type": "linear", "factor": float(opt("rope.scaling.factor", 1.0))}
    if arch == "llama":
        hf["hidden_act"] = "silu"
        hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        return hf

    # gemma3: llama.cpp hard-codes what the GGUF does not say. Every 6th layer is global (sliding pattern
    # 6, transformers' default too); sliding layers use rope base 10000 without scaling; no sliding window
    # key means no sliding layers (newer llama.cpp). The attention scale is 1/sqrt(head_dim) except for the
    # 62-layer 27B model (1/sqrt(d_model / n_heads)); transformers instead keeps Gemma3TextConfig's
    # query_pre_attn_scalar=256, which agrees for every released size but the 27B.
    window = opt("attention.sliding_window")
    window = int(window) if window else None
    pattern = opt("attention.sliding_window_pattern", 6)
    if window is None:
        layer_types = ["full_attention"] * n_layers
    else:
        layer_types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    hf.update({
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": window,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(opt("rope.freq_base_swa", 10000.0))},
        },
        "query_pre_attn_scalar": d_model // n_heads if n_layers == 62 else head_dim,
        "final_logit_softcapping": opt("final_logit_softcapping"),
        "attn_logit_softcapping": opt("attn_logit_softcapping"),
    })
    return hf
