"""GGUF files (llama.cpp) -> our config and state dict, dequantized to float.

A GGUF file holds metadata (`{arch}.embedding_length`, `tokenizer.ggml.tokens`, ...) and tensors named
`blk.N.attn_q.weight` etc., some quantized. We read it with the `gguf` package, dequantize one tensor at a
time, undo what llama.cpp's converter changed relative to the Hugging Face checkpoint, and then go through
the HF names so `from_hf_state_dict` stays the one place that knows our names:

- llama: the converter permutes the rows of Q and K (interleaved rotary pairs instead of HF's halves);
- gemma3: the converter stores every RMSNorm weight as w + 1 (HF stores w and adds 1 at run time);
- a missing `output.weight` means the LM head is tied to the token embeddings;
- gpt2: the converter transposes HF's Conv1D weights to (out, in), fused q/k/v included.

Config values missing from the metadata take the values llama.cpp assumes (its runtime defines the format);
where transformers' GGUF loader assumes something else, the comment says so.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoints.hf import from_hf_state_dict, to_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError, ModelNotFoundError
from lmforge.quant import QuantSpec, pack_nibbles, quantize_int8

SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "gpt2")
_SMALL_ARRAY = 64  # metadata arrays up to this length are kept as lists, longer ones summarised

# GGUF tensor name (without the .weight/.bias suffix) -> HF name, per architecture; {i} is the layer.
_COMMON = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_TENSOR_NAMES: dict[str, dict[str, str]] = {
    "llama": {**_COMMON, "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"},
    "gemma3": {
        **_COMMON,
        "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
        "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
        "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
        "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
        "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
    },
    "gpt2": {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
        "blk.{i}.attn_norm": "transformer.h.{i}.ln_1",
        "blk.{i}.attn_qkv": "transformer.h.{i}.attn.c_attn",
        "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
        "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
        "blk.{i}.ffn_up": "transformer.h.{i}.mlp.c_fc",
        "blk.{i}.ffn_down": "transformer.h.{i}.mlp.c_proj",
    },
}
TENSOR_NAMES = _TENSOR_NAMES  # public: the writer (gguf_write.py) maps the other way with the same table
_GPT2_CONV1D = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
_TENSOR_RX = {
    arch: [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<p>weight|bias)$"), h)
           for g, h in names.items()]
    for arch, names in _TENSOR_NAMES.items()
}


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, in our terms: config, HF config.json equivalent, dequantized tensors."""

    path: Path
    architecture: str  # general.architecture: llama | gemma3
    cfg: ModelConfig
    hf_config: dict[str, Any]  # the config.json transformers would use for these weights (cfg.to_hf())
    body: dict[str, torch.Tensor]  # our tensor names (Transformer.state_dict()), dequantized; {} if tensors=False
    metadata: dict[str, Any]  # GGUF key -> plain Python value; long arrays summarised as "<array of N TYPE>"
    file_type: str | None  # quantization preset named by general.file_type: Q4_1, Q4_K_M, F16, ...
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> number of tensors
    n_bytes: int = 0  # file size on disk
    # read_gguf(quantized=True): which layers `body` holds as integers (QuantLinear state: qweight, scales,
    # mins) instead of float weights; None when every tensor was dequantized
    quant_spec: QuantSpec | None = None

    @property
    def quantization(self) -> str | None:
        return self.file_type


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, tensors: bool = True,
              quantized: bool = False) -> GGUFCheckpoint:
    """Read a llama/gemma3 GGUF file; tensors=False reads only the metadata (fast, no dequantization).

    quantized=True keeps the quantized matrices of the blocks (and the LM head) as QuantLinear integers, tensor
    by tensor, with no float copy of them: see `decode_bits` for which type becomes which path. `ck.quant_spec`
    says what was kept (None if nothing was quantized, e.g. an F16 file); with tensors=False, what would be."""
    path = Path(path)
    reader = _open(path)
    src = str(path)
    arch = _get(reader, "general.architecture", src)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{src}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = [t.name for t in reader.tensors]
    if "rope_freqs.weight" in names:  # llama 3.1+ bakes its rope scaling into a tensor of per-frequency factors
        raise CheckpointError(f"{src}: GGUF rope frequency factors (tensor 'rope_freqs.weight', llama3-style "
                              "rope scaling) are not supported")
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{src}: GGUF file has no tensor 'token_embd.weight'")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hf = _hf_config(reader, arch, src, names, embd_rows=int(embd.shape[1]), dtype=dtype)
    try:
        cfg = ModelConfig.from_hf(hf, source=src)
    except ConfigError as e:
        raise CheckpointError(f"{src}: GGUF metadata gives an unusable config ({e})") from None

    ck = GGUFCheckpoint(
        path=path, architecture=arch, cfg=cfg, hf_config=cfg.to_hf(), body={}, metadata=_metadata(reader),
        file_type=_file_type_name(_opt(reader, "general.file_type")),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)), n_bytes=path.stat().st_size,
    )
    source = f"{ck.file_type or 'quantized'} file"
    if quantized and arch != "gpt2":  # gpt2's fused qkv is split after reading: float path
        reader.fields.clear()
        if tensors:
            ck.body, ck.quant_spec = _read_quantized(reader, arch, cfg, dtype, src, source)
        else:  # what the tensors would be kept as, from their types
            layers, head_bits = _plan(reader, arch, cfg, src)
            ck.quant_spec = _spec(layers, head_bits, source) if layers else None
    if tensors and ck.quant_spec is None:
        reader.fields.clear()  # the parsed token/merge lists take ~0.7 GB for Gemma's 262k vocab; done with them
        hf_tensors = {}
        for t in reader.tensors:  # dequantized one at a time, straight into its final tensor
            hf_tensors[_hf_name(arch, t.name, src)] = _convert(t, arch, cfg, dtype, src)
            reader.release(t)
        ck.body, _heads = from_hf_state_dict(cfg, hf_tensors, src)
        del hf_tensors
        _check_complete(cfg, ck.body, arch, src)
    return ck


# ---- opening and metadata ------------------------------------------------------------------------
def _open(path: Path):
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


def _opt(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else _value(f)


def _get(reader, key: str, src: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise CheckpointError(f"{src}: GGUF metadata lacks required key {key!r}")
    return _value(f)


def _array_len(reader, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else f.count


def _metadata(reader) -> dict[str, Any]:
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


def _file_type_name(ft: int | None) -> str | None:
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


def _hf_config(reader, arch: str, src: str, names: list[str], embd_rows: int, dtype: torch.dtype) -> dict[str, Any]:
    """The HF config.json dict these weights correspond to, from `{arch}.*` and `tokenizer.ggml.*` keys."""
    a = arch

    def req(k: str) -> Any:
        return _one(_get(reader, f"{a}.{k}", src), f"{a}.{k}", src)

    def opt(k: str, default: Any = None) -> Any:
        v = _opt(reader, f"{a}.{k}")
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

    eos: int | list[int] | None = _opt(reader, "tokenizer.ggml.eos_token_id")
    # llama.cpp also ends generation at end-of-turn / end-of-message tokens (transformers keeps eos only)
    extra_eos = [_opt(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    extra_eos = [e for e in extra_eos if e is not None and e != eos]
    if extra_eos:
        eos = ([eos] if eos is not None else []) + extra_eos

    if arch == "gpt2":  # llama.cpp's gpt2: LayerNorm, tanh GELU, learned positions, biases everywhere
        return {
            "model_type": "gpt2", "vocab_size": int(vocab), "n_positions": int(req("context_length")),
            "n_embd": d_model, "n_layer": n_layers, "n_head": n_heads, "n_inner": int(req("feed_forward_length")),
            "layer_norm_epsilon": float(req("attention.layer_norm_epsilon")), "activation_function": "gelu_new",
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": _opt(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": eos,
            "pad_token_id": _opt(reader, "tokenizer.ggml.padding_token_id"),
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
        "bos_token_id": _opt(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": _opt(reader, "tokenizer.ggml.padding_token_id"),
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


# ---- tensors -------------------------------------------------------------------------------------
def _hf_name(arch: str, name: str, src: str) -> str:
    for rx, hf in _TENSOR_RX[arch]:
        m = rx.match(name)
        if m:
            return hf.format(i=m.groupdict().get("i")) + "." + m["p"]
    raise CheckpointError(f"{src}: GGUF tensor {name!r} is not understood for architecture {arch!r}")


def _convert(t, arch: str, cfg: ModelConfig, dtype: torch.dtype, src: str) -> torch.Tensor:
    """Dequantize one GGUF tensor to a torch tensor in HF layout."""
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first; torch slowest-first
    out = _dequantize(t, shape, src)
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
        out = _unpermute_qk(out, cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads)
    if arch == "gemma3" and t.name.endswith("norm.weight"):
        out -= 1.0  # llama.cpp stores Gemma's RMSNorm weight as w + 1; HF (and our norm_offset=1) keep w
    if arch == "gpt2" and t.name.endswith(_GPT2_CONV1D):
        out = out.t().contiguous()  # back to HF's Conv1D layout (in, out)
    return out if dtype == torch.float32 else out.to(dtype)


# ---- quantized tensors kept as integers ---------------------------------------------------------------
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # blocks that are an asymmetric int4 grid in groups of 32
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def decode_bits(type_name: str) -> int | None:
    """The integer path that matches a ggml tensor type. Q4_0 / Q4_1 / Q4_K: int4 in groups of 32, built from the
    blocks themselves, exact (w = q * scale + min holds each block's d, m, and Q4_K's 6-bit sub-scales).
    Any other quantized type (Q5_*, Q6_K, Q8_0, Q2_K, IQ*...): int8 per output channel, requantized from the
    dequantized tensor (more than 4 bits, and the only int8 layout with a fast CPU kernel). Floats: None."""
    if type_name in FLOAT_TYPES:
        return None
    return 4 if type_name in INT4_TYPES else 8


def _our_name(cfg: ModelConfig, hf_name: str, src: str) -> str | None:
    """Our tensor name for one HF name (None: not part of the body, e.g. a tied lm_head)."""
    body, _heads = from_hf_state_dict(cfg, {hf_name: torch.empty(0, device="meta")}, src)
    return next(iter(body), None)


def _linear_weights(cfg: ModelConfig) -> set[str]:
    """Our names of the nn.Linear weights inside the blocks (what QuantLinear replaces)."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}


def _plan(reader, arch: str, cfg: ModelConfig, src: str) -> tuple[dict[str, int], int | None]:
    """Our module name -> bits for each block matrix stored quantized, and the bits of the LM head's matrix
    (output.weight, or token_embd.weight when tied; None if it is stored in float)."""
    linears = _linear_weights(cfg)
    layers: dict[str, int] = {}
    head_t = None
    for t in reader.tensors:
        if t.name == "output.weight" or (t.name == "token_embd.weight" and head_t is None):
            head_t = t
        bits = decode_bits(t.tensor_type.name)
        ours = _our_name(cfg, _hf_name(arch, t.name, src), src) if bits else None
        if ours in linears:
            layers[ours.removesuffix(".weight")] = bits
    return layers, decode_bits(head_t.tensor_type.name) if head_t is not None else None


def _spec(layers: dict[str, int], head_bits: int | None, source: str) -> QuantSpec:
    """The QuantSpec of a plan: the most common format as (bits, group), the other layers listed."""
    counts = {b: list(layers.values()).count(b) for b in set(layers.values())}
    bits = max(counts, key=lambda b: (counts[b], b))
    group = {4: 32, 8: None}
    return QuantSpec(bits=bits, group_size=group[bits], modules=list(layers), head=bool(head_bits), embedding=False,
                     head_bits=head_bits, head_group_size=group[head_bits] if head_bits else None,
                     layers={m: [b, group[b]] for m, b in layers.items() if b != bits}, source=source)


def decode_path(path: str | Path) -> str:
    """The path `quantized=True` loading gives this file, from its tensor types only (reads no weights):
    "int4 (from Q4_1 file)", "int4+int8 (from Q4_K_M file)", or "float32"."""
    spec = read_gguf(path, tensors=False, quantized=True).quant_spec
    return "float32" if spec is None else spec.describe()


def _read_quantized(reader, arch: str, cfg: ModelConfig, dtype: torch.dtype, src: str, source: str
                    ) -> tuple[dict[str, torch.Tensor], QuantSpec | None]:
    """Our state dict with the quantized block matrices (and LM head) as QuantLinear state, one tensor at a time;
    (float body, None) when no block matrix is quantized."""
    layers, head_bits = _plan(reader, arch, cfg, src)
    if not layers:
        return {}, None
    # a tied int8 head and an int8 embedding table (one scale per row) are the same integers: keep them once,
    # and never hold the float table (Gemma-3's 262k x 640 would be 671 MB of float32)
    shared = head_bits == 8 and cfg.tie_embeddings
    body: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # float shape of each weight kept as integers (for the checks)
    head_t = None
    for t in reader.tensors:
        if t.name == "output.weight" or (t.name == "token_embd.weight" and head_t is None):
            head_t = t
        ours = _our_name(cfg, _hf_name(arch, t.name, src), src)
        if ours is None:
            continue
        mod = ours.removesuffix(".weight")
        if mod in layers or (shared and ours == "embed.tok.weight"):
            body.update({f"{mod}.{k}": v for k, v in _int_state(t, layers.get(mod, 8), arch, cfg, src).items()})
            shapes[ours] = tuple(int(s) for s in reversed(t.shape))
        else:
            body[ours] = _convert(t, arch, cfg, dtype, src)
        if t is not head_t or shared:  # a separate int8 head is read again below
            reader.release(t)
    _check_complete(cfg, {**body, **{k: torch.empty(s, device="meta") for k, s in shapes.items()}}, arch, src)
    if shared:
        body["quant_head.qweight"], body["quant_head.scales"] = body["embed.tok.qweight"], body["embed.tok.scales"]
    elif head_bits:
        dense = body["lm_head.weight"] if "lm_head.weight" in body else body["embed.tok.weight"]
        state = _int_state(head_t, head_bits, arch, cfg, src, dense=dense.float())
        body.update({f"quant_head.{k}": v for k, v in state.items()})
    spec = _spec(layers, head_bits, source)
    spec.embedding = shared
    return body, spec


def _int_state(t, bits: int, arch: str, cfg: ModelConfig, src: str, dense: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """QuantLinear state for one GGUF matrix: int4 straight from its blocks, or int8 per channel from its
    float values (`dense` when already dequantized, else dequantized here, this tensor only)."""
    if bits == 4:
        q, scales, mins = int4_grid(t, src)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):  # rows only: blocks run along K
            n = cfg.n_heads if ".attn_q." in t.name else cfg.n_kv_heads
            q, scales, mins = (_unpermute_qk(x, n) for x in (q, scales, mins))
        return {"qweight": pack_nibbles(q), "scales": scales, "mins": mins}
    if dense is None and t.name == "token_embd.weight":  # dequantized a slice of rows at a time
        rows = _rows(t)
        N = rows.shape[0]

        def chunk(i: int) -> torch.Tensor:
            return _dequantize_rows(t, rows[i: i + _CHUNK_ROWS], src)
    else:
        w = dense if dense is not None else _convert(t, arch, cfg, torch.float32, src)
        N = w.shape[0]

        def chunk(i: int) -> torch.Tensor:
            return w[i: i + _CHUNK_ROWS]
    # written into preallocated results: the chunks' temporaries reuse one region instead of fragmenting the heap
    qweight, scales = None, None
    for i in range(0, N, _CHUNK_ROWS):
        q, sc = quantize_int8(chunk(i))
        if qweight is None:
            qweight = torch.empty(N, q.shape[1], dtype=q.dtype)
            scales = torch.empty(N, sc.shape[1], dtype=sc.dtype)
        qweight[i: i + len(q)], scales[i: i + len(q)] = q, sc
    return {"qweight": qweight, "scales": scales}


def int4_grid(t, src: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks -> q (N, K) uint8 in 0..15, scales and mins (N, K/32) float32 with
    w = q * scale + min, computed as gguf's dequantize computes it (so the float weights agree bit for bit).

    Q4_0: 32 weights (d f16, 16 bytes), w = d * (q - 8): scale d, min -8d. Q4_1: (d, m f16, 16 bytes), w = d*q + m.
    In both, byte j holds weight j (low nibble) and weight j + 16 (high nibble). Q4_K: 256 weights (d, dmin f16,
    12 bytes of 6-bit sub-scales sc and sub-mins mn for 8 groups of 32, 128 bytes): w = d*sc * q - dmin*mn; byte
    j of each 32-byte chunk c holds weight j of group 2c (low nibble) and of group 2c + 1 (high nibble)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import Q4_K

    kind = t.tensor_type.name
    K = int(t.shape[0])
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    raw = np.asarray(t.data).reshape(-1, K // block, size)  # (N, blocks per row, bytes per block)
    N, nb = raw.shape[:2]

    def f16(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view(np.float16).astype(np.float32)  # (N, nb, 1)

    def nibbles(qs: np.ndarray) -> np.ndarray:  # (..., n bytes) -> (..., 2n): low nibbles first, then high
        return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)

    if kind == "Q4_0":
        d = f16(raw[..., 0:2])
        scales, mins, q = d, -8.0 * d, nibbles(raw[..., 2:18])
    elif kind == "Q4_1":
        scales, mins, q = f16(raw[..., 0:2]), f16(raw[..., 2:4]), nibbles(raw[..., 4:20])
    elif kind == "Q4_K":
        d, dmin = f16(raw[..., 0:2]), f16(raw[..., 2:4])  # (N, nb, 1)
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(raw[..., 4:16]).reshape(N * nb, 12))  # (N*nb, 8)
        scales = d * sc.reshape(N, nb, 8).astype(np.float32)  # (N, nb, 8)
        mins = -(dmin * mn.reshape(N, nb, 8).astype(np.float32))
        q = nibbles(raw[..., 16:].reshape(N, nb, 4, 32))  # (N, nb, 4, 64): groups 2c, 2c + 1
        return (torch.from_numpy(np.ascontiguousarray(q.reshape(N, K))),
                torch.from_numpy(scales.reshape(N, nb * 8)), torch.from_numpy(mins.reshape(N, nb * 8)))
    else:
        raise CheckpointError(f"{src}: GGUF tensor {t.name!r} of type {kind} is not an int4 grid")
    return (torch.from_numpy(np.ascontiguousarray(q.reshape(N, K))),
            torch.from_numpy(np.ascontiguousarray(scales.reshape(N, nb))),
            torch.from_numpy(np.ascontiguousarray(mins.reshape(N, nb))))


_CHUNK_ROWS = 1024  # dequantize big tensors (the 262k-row Gemma embedding) in slices: temporaries of a few MB


def _rows(t) -> np.ndarray:
    """A tensor's raw data as (rows, bytes or values per row)."""
    return t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)


def _dequantize_rows(t, data: np.ndarray, src: str) -> torch.Tensor:
    """gguf's dequantize of some raw rows of `t` -> float32 (rows, K)."""
    from gguf import dequantize

    try:
        a = np.ascontiguousarray(dequantize(data, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{src}: cannot dequantize GGUF tensor {t.name!r} of type {t.tensor_type.name} "
                              f"({msg})") from None
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 data is a read-only view of the file


def _dequantize(t, shape: tuple[int, ...], src: str) -> torch.Tensor:
    """gguf's dequantize into one preallocated float32 tensor of torch shape `shape`."""
    out = torch.empty(shape, dtype=torch.float32)
    data = _rows(t)
    rows = out.view(data.shape[0], -1)  # shares memory with `out`
    for i in range(0, data.shape[0], _CHUNK_ROWS):
        rows[i: i + _CHUNK_ROWS] = _dequantize_rows(t, data[i: i + _CHUNK_ROWS], src)
    return out


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, rotary pairs interleaved (x0,y0,x1,y1,..) -> halves (x..,y..).

    The converter views each head's rows as (2, hd/2) and transposes to (hd/2, 2); we view them as (hd/2, 2)
    and transpose back. w: (n_head * hd, D) weight or (n_head * hd,) bias.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _check_complete(cfg: ModelConfig, body: dict[str, torch.Tensor], arch: str, src: str) -> None:
    """Every tensor the config needs is present with its shape; errors name the GGUF tensor."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        own = Transformer(cfg).state_dict()
    missing = [k for k in own if k not in body]
    if missing:
        raise CheckpointError(f"{src}: GGUF file lacks tensor {_gguf_name(cfg, arch, missing[0])!r} needed by "
                              f"its config" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, t in body.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{src}: GGUF tensor {_gguf_name(cfg, arch, k)!r} has shape {tuple(t.shape)} but "
                                  f"the metadata gives {tuple(own[k].shape)}")


def _gguf_name(cfg: ModelConfig, arch: str, ours: str) -> str:
    """The GGUF name of one of our tensor names, for error messages."""
    try:
        (hf,) = to_hf_state_dict(cfg, {ours: torch.empty(0)}).keys()
    except CheckpointError:
        return ours
    for g, h in _TENSOR_NAMES[arch].items():
        m = re.match("^" + re.escape(h).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<p>weight|bias)$", hf)
        if m:
            return g.format(i=m.groupdict().get("i")) + "." + m["p"]
    return ours
