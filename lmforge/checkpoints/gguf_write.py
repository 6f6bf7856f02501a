"""Our config + state dict + tokenizer -> a GGUF file that llama.cpp runs the way lmforge does.

The mirror of gguf.py (the reader): tensor names come from the same table read backwards, and what the
reader undoes is done here, so `read_gguf(write_gguf(...))` gives back the same model:

- llama (Mistral and Mixtral are llama.cpp's llama): Q and K rows permuted per head into llama.cpp's
  interleaved rotary order; Llama 3 rope scaling as `rope_freqs.weight` (per-frequency divisors);
- gemma2 / gemma3: every RMSNorm weight stored as w + 1 (llama.cpp adds nothing at run time);
- mixtures (mixtral, qwen3_moe): each layer's experts stacked into one 3-D tensor per projection;
- phi3: fused q|k|v and gate|up as they are, longrope as `rope_factors_long/short.weight`;
- gpt2: q/k/v fused into `attn_qkv`, weights in (out, in) layout.

The tokenizer is written as llama.cpp reads it (`tokenizer.ggml.*`): byte-level BPE as model "gpt2" with its
merges and split-regex name, SentencePiece-style BPE (byte fallback) as model "llama" with scores that
encode the merge order. What llama.cpp cannot reproduce (another pre-tokenizer, a layer pattern it
hard-codes differently) is an ExportError rather than a file that silently behaves differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoints.gguf import TENSOR_NAMES
from lmforge.checkpoints.hf import to_hf_state_dict
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write
from lmforge.model.layers import longrope, rope_inv_freq
from lmforge.tokenizer.gguf import PRE_SPLITS

__all__ = ["ExportError", "GGUF_TYPES", "GGUF_ARCH", "check_exportable", "write_gguf"]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# lmforge family -> the llama.cpp architecture it is exported as (Mistral and Mixtral are llama.cpp's llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "olmo2": "olmo2", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3",
             "gpt2": "gpt2"}
_QK_BLOCK = 32  # q8_0 / q4_0 quantize rows in blocks of 32 values

# llama.cpp token types (llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# split regexes llama.cpp knows by `tokenizer.ggml.pre` name (see lmforge/tokenizer/gguf.py's reader for the same table)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class ExportError(LmforgeError):
    """A model, run dir, type or output path that cannot be exported as asked."""


# ---- checks: what llama.cpp can run ---------------------------------------------------------------
ANY = object()  # a field llama.cpp's architecture takes as it is (written to the file)
_LLAMA_LIKE = dict(norm="rmsnorm", norm_offset=0.0, norm_placement="pre", mlp="swiglu", activation="silu",
                   position="rotary", sliding_window=None, embed_scale=None, attn_softcap=None, final_softcap=None,
                   mlp_bias=False, rotary_fraction=1.0, n_experts=0)
_GEMMA = dict(norm="rmsnorm", norm_offset=1.0, norm_placement="sandwich", mlp="geglu", activation="gelu_tanh",
              position="rotary", rotary_fraction=1.0, n_experts=0)
# what llama.cpp's architecture computes, per family: a config field with another value is refused
_WANT: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE | dict(qk_norm=False),
    "mistral": _LLAMA_LIKE | dict(qk_norm=False, attn_bias=False),
    "mixtral": _LLAMA_LIKE | dict(qk_norm=False, attn_bias=False, n_experts=ANY, moe_norm_topk=True,
                                  dense_layers=None),
    "qwen2": _LLAMA_LIKE | dict(qk_norm=False, attn_bias=True, attn_out_bias=False),  # it runs no window
    "qwen3": _LLAMA_LIKE | dict(qk_norm=True, qk_norm_scope="head", attn_bias=False),
    "qwen3_moe": _LLAMA_LIKE | dict(qk_norm=True, qk_norm_scope="head", attn_bias=False, n_experts=ANY,
                                    moe_norm_topk=True),  # llama.cpp's qwen3moe: every layer sparse
    "olmo2": _LLAMA_LIKE | dict(norm_placement="output", qk_norm=True, qk_norm_scope="all", attn_bias=False),
    # phi3: partial rotary, longrope and the window are written (the window as llama.cpp's converter writes it)
    "phi3": _LLAMA_LIKE | dict(qk_norm=False, attn_bias=False, rotary_fraction=ANY, sliding_window=ANY),
    "gemma2": _GEMMA | dict(qk_norm=False),
    "gemma3": _GEMMA | dict(qk_norm=True, attn_softcap=None, final_softcap=None),
    "gpt2": dict(norm="layernorm", norm_placement="pre", mlp="gelu", activation="gelu_tanh", position="learned",
                 attn_bias=True, mlp_bias=True),
}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp hard-codes: every n-th layer global, the rest sliding


def check_exportable(cfg: ModelConfig, source: str) -> None:
    """Raise ExportError when llama.cpp's architecture for `cfg.family` would compute something else."""
    fam = cfg.family
    if fam not in _WANT:
        hint = " (encoder models: use --format hf)" if not cfg.causal else ""
        raise ExportError(f"{source}: family {fam!r} cannot be exported to GGUF; llama.cpp runs "
                          f"{', '.join(_WANT)} here{hint}")
    want: dict[str, Any] = {"causal": True} | _WANT[fam]
    if fam in ("mistral", "mixtral") and cfg.sliding_window and cfg.sliding_window >= cfg.context_length:
        want["sliding_window"] = cfg.sliding_window  # a window over the whole context is no window
    for name, value in want.items():
        if value is ANY:  # written as it is; n_experts: a mixture, any number of experts
            if name == "n_experts" and not cfg.n_experts:
                raise ExportError(f"{source}: config field 'n_experts' = 0: a {fam} model has experts")
            continue
        if getattr(cfg, name) != value:
            raise ExportError(f"{source}: config field {name!r} = {getattr(cfg, name)!r} has no llama.cpp "
                              f"{GGUF_ARCH[fam]} equivalent (it assumes {value!r})")
    if cfg.n_experts and cfg.expert_d_ff not in (None, cfg.d_ff) and fam == "mixtral":
        raise ExportError(f"{source}: config field 'expert_d_ff' = {cfg.expert_d_ff} differs from 'd_ff' "
                          f"= {cfg.d_ff}; llama.cpp's llama experts are d_ff wide")
    if fam == "qwen3_moe" and cfg.dense_layers:
        raise ExportError(f"{source}: config field 'dense_layers' = {cfg.dense_layers}: llama.cpp's qwen3moe has "
                          "no dense MLP layers")
    if cfg.position == "rotary" and cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        ok = {"linear"} | ({"llama3"} if GGUF_ARCH[fam] == "llama" else set()) | \
            ({"longrope"} if fam == "phi3" else set())
        if kind not in ok:
            raise ExportError(f"{source}: config field 'rope_scaling' type {kind!r} is not exported for "
                              f"{fam} (only {', '.join(sorted(ok))})")
    if fam in _SWA_PERIOD:
        _check_gemma(cfg, source)


def _check_gemma(cfg: ModelConfig, source: str) -> None:
    fam, n, period = cfg.family, cfg.n_layers, _SWA_PERIOD[cfg.family]
    expect = ["full" if (i + 1) % period == 0 else "sliding" for i in range(n)]
    if cfg.sliding_window and list(cfg.layer_types or []) != expect:
        raise ExportError(f"{source}: config field 'layer_types' must put a global layer every "
                          f"{period}th layer, as llama.cpp's {fam} hard-codes")
    if fam == "gemma2" and (cfg.attn_softcap is None or cfg.final_softcap is None):
        raise ExportError(f"{source}: config fields 'attn_softcap' / 'final_softcap' must be set: llama.cpp's "
                          "gemma2 always soft-caps")
    if fam == "gemma2" and not cfg.sliding_window:
        raise ExportError(f"{source}: config field 'sliding_window' is unset; llama.cpp's gemma2 slides every "
                          "other layer (4096 when the file says nothing)")
    local = cfg.rope_local_theta or (10000.0 if fam == "gemma3" else cfg.rope_theta)
    if local != (10000.0 if fam == "gemma3" else cfg.rope_theta):
        raise ExportError(f"{source}: config field 'rope_local_theta' = {cfg.rope_local_theta} differs from what "
                          f"llama.cpp's {fam} uses for sliding layers")
    big = n == (62 if fam == "gemma3" else 46)  # the 27B models: 1/sqrt(d_model / n_heads)
    scale = (cfg.d_model // cfg.n_heads if big else cfg.head_dim) ** -0.5
    if cfg.attn_scale is not None and abs(cfg.attn_scale - scale) > 1e-6 * scale:
        raise ExportError(f"{source}: config field 'attn_scale' = {cfg.attn_scale} differs from the "
                          f"{scale:.6g} llama.cpp's {fam} uses")
    if cfg.embed_scale is not None and abs(cfg.embed_scale - cfg.d_model ** 0.5) > 1e-3:
        raise ExportError(f"{source}: config field 'embed_scale' = {cfg.embed_scale} is not "
                          f"sqrt(d_model), which llama.cpp's {fam} uses")


# ---- tensors --------------------------------------------------------------------------------------
def _gguf_tensors(cfg: ModelConfig, body: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Our state dict -> GGUF name -> float32 tensor in llama.cpp's layout (torch order: slowest dim first).
    Experts go into one 3-D tensor per layer and projection, (experts, rows, cols)."""
    fam, arch = cfg.family, GGUF_ARCH[cfg.family]
    names = TENSOR_NAMES["llama" if fam == "mistral" else fam]
    rx = [(re.compile("^" + re.escape(h).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
                      + r"\.(?P<p>weight|bias)$"), g) for g, h in names.items()]
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for hf_name, t in to_hf_state_dict(cfg, body).items():
        found = next(((m, g) for r, g in rx if (m := r.match(hf_name))), None)
        if found is None:
            raise ExportError(f"{source}: tensor {hf_name!r} has no GGUF name for architecture {arch!r}")
        m, g = found
        name = g.format(i=m.groupdict().get("i")) + "." + m["p"]
        w = t.detach().to(device="cpu", dtype=torch.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = _permute_qk(w, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp multiplies by the stored weight; HF and we store w and add 1
        if arch == "gpt2" and w.ndim == 2 and name not in ("token_embd.weight", "position_embd.weight",
                                                              "output.weight"):
            w = w.t()  # HF Conv1D (in, out) -> (out, in)
        if m.groupdict().get("e") is not None:
            experts.setdefault(name, {})[int(m["e"])] = w
        else:
            out[name] = w.contiguous()
    for name, per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.n_experts)):
            raise ExportError(f"{source}: {name} has experts {sorted(per_expert)}, expected 0..{cfg.n_experts - 1}")
        out[name] = torch.stack([per_expert[e] for e in range(cfg.n_experts)])  # (E, rows, cols)
    out |= _rope_tensors(cfg)
    return out


def _rope_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rope scalings llama.cpp keeps as tensors: llama3 as per-frequency divisors of the base frequencies
    (`rope_freqs`), Phi-3's longrope as its two factor lists."""
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "llama3":
        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None).double()  # (head_dim/2,)
        return {"rope_freqs.weight": (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
                                      ).float()}
    if kind == "longrope":
        return {f"rope_factors_{k}.weight": torch.tensor(cfg.rope_scaling[f"{k}_factor"], dtype=torch.float32)
                for k in ("long", "short")}
    return {}


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Q/K: per head, halves (x.., y..) -> interleaved pairs (x0, y0, x1, y1, ..)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(w: torch.Tensor, qtype):
    """(array, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors stay f32, rows not a block multiple go f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = w.numpy()
    if w.ndim < 2 or qtype == Q.F32:
        return a.astype(np.float32), None
    if qtype in (Q.Q8_0, Q.Q4_0) and a.shape[-1] % _QK_BLOCK:
        qtype = Q.F16  # what llama.cpp's converter does for rows that do not fill whole blocks
    if qtype == Q.F16:
        return a.astype(np.float16), None
    return quants.quantize(a, qtype), qtype


# ---- tokenizer ------------------------------------------------------------------------------------
def _split_name(pre: dict | None, source: str, ignore_merges: bool = False) -> str:
    """The `tokenizer.ggml.pre` name whose split regex equals this byte-level pre-tokenizer's."""
    def is_bytelevel(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex \
            and not p.get("add_prefix_space", False)

    if pre and is_bytelevel(pre, True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split regex
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and is_bytelevel(steps[1], True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and is_bytelevel(steps[1], False):
        name = _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    if len(steps) >= 2 and all(p.get("type") == "Split" for p in steps[:-1]) and is_bytelevel(steps[-1], False):
        # the form lmforge's GGUF reader builds (lmforge.tokenizer.gguf): its table, read backwards
        regexes = tuple((p.get("pattern") or {}).get("Regex") for p in steps[:-1])
        for name, (splits, whole_words) in PRE_SPLITS.items():
            if splits == regexes and whole_words == ignore_merges:
                return name
    raise ExportError(f"{source}: the byte-level tokenizer's pre-tokenizer ({json.dumps(pre)[:80]}) has no "
                      "llama.cpp equivalent (supported: GPT-2, SmolLM, Llama-3 and Qwen2 splits)")


def _spm_prefix(backend: dict, arch: str, source: str) -> bool:
    """SentencePiece-style BPE: whether llama.cpp must add a leading space (Metaspace prepend)."""
    norm, pre = backend.get("normalizer") or {}, backend.get("pre_tokenizer") or {}
    gemma_style = norm.get("type") == "Replace" and norm.get("content") == "\u2581" \
        and (pre.get("type") in (None, "Split"))
    if arch in ("gemma2", "gemma3") and gemma_style:
        return False
    if arch not in ("gemma2", "gemma3") and pre.get("type") == "Metaspace" and not norm:
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String"), n.get("content"))
             for n in steps]
    if arch not in ("gemma2", "gemma3") and not pre and kinds[-1:] == [("Replace", " ", "\u2581")] \
            and kinds[:-1] in ([], [("Prepend", "\u2581", None)]):  # transformers' Llama converter (legacy=False)
        return bool(kinds[:-1])
    raise ExportError(f"{source}: SentencePiece-style tokenizer (normalizer {norm.get('type')}, pre-tokenizer "
                      f"{pre.get('type')}) does not match what llama.cpp's {arch} expects")


def _tokenizer_metadata(tok, arch: str, n_vocab: int, source: str) -> dict[str, tuple[str, Any]]:
    """GGUF key -> (writer kind, value) for the tokenizer, so llama.cpp tokenizes as `tok` does."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{source}: tokenizer model {model.get('type')!r} is not exported to GGUF "
                          "(supported: byte-level BPE, SentencePiece-style BPE)")
    added = {i: t for i, t in tok.backend.get_added_tokens_decoder().items()}
    id_to_tok = {i: t for t, i in model["vocab"].items()} | {i: t.content for i, t in added.items()}
    size = max(id_to_tok) + 1
    if size > n_vocab:
        raise ExportError(f"{source}: the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    spm = bool(model.get("byte_fallback"))
    tokens, types = [], []
    unk = tok.unk_id
    for i in range(n_vocab):  # rows without a token (padded embeddings) get llama.cpp's [PADn] unused entries
        t = id_to_tok.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(t)
            types.append(_CONTROL if i in added and added[i].special else _USER_DEFINED if i in added
                         else _UNKNOWN if i == unk else _BYTE if spm and _BYTE_TOKEN.match(t) else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, tuple[str, Any]] = {"tokenizer.ggml.tokens": ("array", tokens),
                                        "tokenizer.ggml.token_type": ("int_array", types)}
    if spm:  # llama.cpp's SentencePiece merges the adjacent pair whose result scores highest: -merge rank
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        low = -float(len(merges) + 1)
        scores = [-float(rank[t]) if t in rank else low for t in tokens]
        meta |= {"tokenizer.ggml.model": ("str", "llama"), "tokenizer.ggml.pre": ("str", "default"),
                 "tokenizer.ggml.scores": ("float_array", scores),
                 "tokenizer.ggml.add_space_prefix": ("bool", _spm_prefix(spec, arch, source))}
    else:
        meta |= {"tokenizer.ggml.model": ("str", "gpt2"),
                 "tokenizer.ggml.pre": ("str", _split_name(spec.get("pre_tokenizer"), source,
                                                                 bool(model.get("ignore_merges")))),
                 "tokenizer.ggml.merges": ("array", merges),
                 "tokenizer.ggml.add_space_prefix": ("bool", False)}
    eos = tok.eos_id
    with_specials, plain = tok.encode("a"), tok.encode("a", add_special_tokens=False)
    ids = {"bos": tok.bos_id, "eos": eos, "unknown": unk, "padding": tok.pad_id if tok.has_pad_token else None,
           "eot": next((e for e in tok.eos_ids if e != eos), None)}
    meta |= {f"tokenizer.ggml.{k}_token_id": ("uint32", v) for k, v in ids.items() if v is not None}
    meta["tokenizer.ggml.add_bos_token"] = ("bool", bool(tok.add_bos))
    meta["tokenizer.ggml.add_eos_token"] = ("bool", eos is not None and len(with_specials) > len(plain)
                                            and with_specials[-1] == eos)
    if tok.chat_template:
        meta["tokenizer.chat_template"] = ("str", tok.chat_template)
    return meta


# ---- the file -------------------------------------------------------------------------------------
def _arch_metadata(cfg: ModelConfig) -> dict[str, tuple[str, Any]]:
    fam, a = cfg.family, GGUF_ARCH[cfg.family]
    meta: dict[str, tuple[str, Any]] = {
        f"{a}.context_length": ("uint32", cfg.context_length),
        f"{a}.embedding_length": ("uint32", cfg.d_model),
        f"{a}.block_count": ("uint32", cfg.n_layers),
        f"{a}.feed_forward_length": ("uint32", cfg.d_ff),
        f"{a}.attention.head_count": ("uint32", cfg.n_heads),
    }
    if a == "gpt2":
        meta[f"{a}.attention.layer_norm_epsilon"] = ("float32", cfg.norm_eps)
        return meta
    meta |= {
        f"{a}.attention.head_count_kv": ("uint32", cfg.n_kv_heads),
        f"{a}.attention.layer_norm_rms_epsilon": ("float32", cfg.norm_eps),
        f"{a}.attention.key_length": ("uint32", cfg.head_dim),
        f"{a}.attention.value_length": ("uint32", cfg.head_dim),
        f"{a}.rope.freq_base": ("float32", cfg.rope_theta),
        f"{a}.vocab_size": ("uint32", cfg.vocab_size),
    }
    if a in ("llama", "phi3"):
        meta[f"{a}.rope.dimension_count"] = ("uint32", int(cfg.head_dim * cfg.rotary_fraction))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        meta[f"{a}.rope.scaling.type"] = ("str", "linear")
        meta[f"{a}.rope.scaling.factor"] = ("float32", float(scaling.get("factor", 1.0)))
    if cfg.n_experts:
        meta[f"{a}.expert_count"] = ("uint32", cfg.n_experts)
        meta[f"{a}.expert_used_count"] = ("uint32", cfg.n_experts_active)
        if a == "qwen3moe":
            meta[f"{a}.expert_feed_forward_length"] = ("uint32", cfg.expert_d_ff or cfg.d_ff)
    if fam == "phi3":
        meta[f"{a}.attention.sliding_window"] = ("uint32", cfg.sliding_window or 0)
        if kind == "longrope":
            rot = int(cfg.head_dim * cfg.rotary_fraction)
            _, orig, attn_factor = longrope(rot, cfg.rope_theta, scaling | {"max_position_embeddings":
                                                                            cfg.context_length})
            meta[f"{a}.rope.scaling.original_context_length"] = ("uint32", orig)
            meta[f"{a}.rope.scaling.attn_factor"] = ("float32", attn_factor)
    if a in ("gemma2", "gemma3") and cfg.sliding_window:
        meta[f"{a}.attention.sliding_window"] = ("uint32", cfg.sliding_window)
    if a == "gemma2":  # llama.cpp's gemma2 caps at 50 / 30 unless the file says otherwise
        meta[f"{a}.attn_logit_softcapping"] = ("float32", cfg.attn_softcap)
        meta[f"{a}.final_logit_softcapping"] = ("float32", cfg.final_softcap)
    return meta


def write_gguf(path: str | Path, cfg: ModelConfig, body: dict[str, torch.Tensor], tokenizer,
               type: str = "f16", name: str = "lmforge export", source: str = "model") -> Path:
    """Write `body` (our Transformer state dict, LoRA already merged) and its tokenizer as one GGUF file.

    The file appears whole or not at all (lmforge.io.atomic_write: written next to `path`, then renamed);
    a disk that is full, over quota or read-only raises OSError with that errno (tasks.export reports it).
    """
    import gguf

    path = Path(path)
    if type not in GGUF_TYPES:
        raise ExportError(f"--type {type!r}: unknown GGUF type (choose from {', '.join(GGUF_TYPES)})")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: output directory {path.parent} does not exist")
    check_exportable(cfg, source)
    if tokenizer is None:
        raise ExportError(f"{source}: no tokenizer files; a GGUF file must carry its tokenizer")
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    ftype = {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
             "q4_0": F.MOSTLY_Q4_0}[type]

    meta = {"general.name": ("str", name), "general.file_type": ("uint32", int(ftype)),
            "general.quantization_version": ("uint32", gguf.GGML_QUANT_VERSION)}
    meta |= _arch_metadata(cfg) | _tokenizer_metadata(tokenizer, GGUF_ARCH[cfg.family], cfg.vocab_size, source)
    tensors = _gguf_tensors(cfg, body, source)

    def fill(w) -> None:
        for key, (kind, value) in meta.items():
            _add(w, key, kind, value, gguf)
        for tname, t in tensors.items():
            arr, raw = _encode(t, qtype)
            w.add_tensor(tname, arr, raw_dtype=raw)

    return write_gguf_atomic(path, GGUF_ARCH[cfg.family], fill)


def write_gguf_atomic(path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """One GGUF file at `path`: `fill(writer)` adds the metadata and tensors to a gguf.GGUFWriter, then header,
    metadata and tensors are written to a temp file beside `path` and renamed over it, so a failed write (a full
    disk included) leaves nothing."""
    import gguf

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            fill(w)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    return atomic_write(path, write)


def _add(w, key: str, kind: str, value: Any, gguf) -> None:
    V = gguf.GGUFValueType
    if kind == "str":
        w.add_string(key, value)
    elif kind == "bool":
        w.add_bool(key, bool(value))
    elif kind == "uint32":
        w.add_uint32(key, int(value))
    elif kind == "float32":
        w.add_float32(key, float(value))
    elif kind == "int_array":
        w.add_key_value(key, [int(v) for v in value], V.ARRAY, sub_type=V.INT32)
    elif kind == "float_array":
        w.add_key_value(key, [float(v) for v in value], V.ARRAY, sub_type=V.FLOAT32)
    else:
        w.add_array(key, list(value))
