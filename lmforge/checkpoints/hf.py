"""Hugging Face directories <-> our state dict: one name map per family, and save_pretrained.

A HF checkpoint is config.json + model.safetensors (or shards with model.safetensors.index.json, or a
pytorch_model.bin read with weights_only=True). Our tensor names are the module paths of Transformer and
its heads; the maps below are the whole difference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ModelNotFoundError
from lmforge.io import atomic_write

# (HF name relative to the backbone prefix, our name); {i} is the layer index.
_ATTN = [
    ("layers.{i}.self_attn.q_proj.{p}", "blocks.{i}.attn.q.{p}"),
    ("layers.{i}.self_attn.k_proj.{p}", "blocks.{i}.attn.k.{p}"),
    ("layers.{i}.self_attn.v_proj.{p}", "blocks.{i}.attn.v.{p}"),
]
_CORE = [
    ("embed_tokens.weight", "embed.tok.weight"),
    ("layers.{i}.self_attn.o_proj.{p}", "blocks.{i}.attn.o.{p}"),
    ("norm.weight", "norm.weight"),
]
_DOWN = [("layers.{i}.mlp.down_proj.{p}", "blocks.{i}.mlp.down.{p}")]
_GATED = [
    ("layers.{i}.mlp.gate_proj.{p}", "blocks.{i}.mlp.gate.{p}"),
    ("layers.{i}.mlp.up_proj.{p}", "blocks.{i}.mlp.up.{p}"),
    *_DOWN,
]
_QK_NORM = [
    ("layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    ("layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
]
_PRE_NORMS = [
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.norm1.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.norm2.weight"),
]
_SANDWICH = [
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.norm1.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.post_norm1.weight"),
    ("layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.norm2.weight"),
    ("layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.post_norm2.weight"),
]
_LLAMA = _ATTN + _CORE + _GATED + _PRE_NORMS
_NAMES: dict[str, list[tuple[str, str]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA + _QK_NORM,
    "olmo2": _ATTN + _CORE + _GATED + _QK_NORM + [
        ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.norm1.weight"),
        ("layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.norm2.weight"),
    ],
    # Phi-3 fuses q|k|v (qkv_proj) and gate|up (gate_up_proj): split on load, fused on save (FUSED below)
    "phi3": _CORE + _DOWN + _PRE_NORMS,
    # mixtures: a router and per-expert gated MLPs ({e}) in the layers that have them; dense MLPs elsewhere
    "qwen3_moe": _LLAMA + _QK_NORM + [
        ("layers.{i}.mlp.gate.weight", "blocks.{i}.mlp.router.weight"),
        ("layers.{i}.mlp.experts.{e}.gate_proj.{p}", "blocks.{i}.mlp.experts.{e}.gate.{p}"),
        ("layers.{i}.mlp.experts.{e}.up_proj.{p}", "blocks.{i}.mlp.experts.{e}.up.{p}"),
        ("layers.{i}.mlp.experts.{e}.down_proj.{p}", "blocks.{i}.mlp.experts.{e}.down.{p}"),
    ],
    "mixtral": _ATTN + _CORE + _PRE_NORMS + [
        ("layers.{i}.block_sparse_moe.gate.weight", "blocks.{i}.mlp.router.weight"),
        ("layers.{i}.block_sparse_moe.experts.{e}.w1.{p}", "blocks.{i}.mlp.experts.{e}.gate.{p}"),
        ("layers.{i}.block_sparse_moe.experts.{e}.w3.{p}", "blocks.{i}.mlp.experts.{e}.up.{p}"),
        ("layers.{i}.block_sparse_moe.experts.{e}.w2.{p}", "blocks.{i}.mlp.experts.{e}.down.{p}"),
    ],
    "gemma2": _ATTN + _CORE + _GATED + _SANDWICH,
    "gemma3": _ATTN + _CORE + _GATED + _SANDWICH + _QK_NORM,
    "gpt2": [
        ("wte.weight", "embed.tok.weight"),
        ("wpe.weight", "embed.pos.weight"),
        ("h.{i}.ln_1.{p}", "blocks.{i}.norm1.{p}"),
        ("h.{i}.ln_2.{p}", "blocks.{i}.norm2.{p}"),
        ("h.{i}.attn.c_proj.{p}", "blocks.{i}.attn.o.{p}"),  # Conv1D: transposed
        ("h.{i}.mlp.c_fc.{p}", "blocks.{i}.mlp.fc1.{p}"),  # Conv1D: transposed
        ("h.{i}.mlp.c_proj.{p}", "blocks.{i}.mlp.fc2.{p}"),  # Conv1D: transposed
        ("ln_f.{p}", "norm.{p}"),
    ],
    "bert": [
        ("embeddings.word_embeddings.weight", "embed.tok.weight"),
        ("embeddings.position_embeddings.weight", "embed.pos.weight"),
        ("embeddings.token_type_embeddings.weight", "embed.seg.weight"),
        ("embeddings.LayerNorm.{p}", "embed.norm.{p}"),
        ("encoder.layer.{i}.attention.self.query.{p}", "blocks.{i}.attn.q.{p}"),
        ("encoder.layer.{i}.attention.self.key.{p}", "blocks.{i}.attn.k.{p}"),
        ("encoder.layer.{i}.attention.self.value.{p}", "blocks.{i}.attn.v.{p}"),
        ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.o.{p}"),
        ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "blocks.{i}.norm1.{p}"),
        ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.fc1.{p}"),
        ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.fc2.{p}"),
        ("encoder.layer.{i}.output.LayerNorm.{p}", "blocks.{i}.norm2.{p}"),
        ("pooler.dense.{p}", "pooler.{p}"),
    ],
}
_NAMES["roberta"] = _NAMES["xlm-roberta"] = _NAMES["bert"]
_NAMES["distilbert"] = [
    ("embeddings.word_embeddings.weight", "embed.tok.weight"),
    ("embeddings.position_embeddings.weight", "embed.pos.weight"),
    ("embeddings.LayerNorm.{p}", "embed.norm.{p}"),
    ("transformer.layer.{i}.attention.q_lin.{p}", "blocks.{i}.attn.q.{p}"),
    ("transformer.layer.{i}.attention.k_lin.{p}", "blocks.{i}.attn.k.{p}"),
    ("transformer.layer.{i}.attention.v_lin.{p}", "blocks.{i}.attn.v.{p}"),
    ("transformer.layer.{i}.attention.out_lin.{p}", "blocks.{i}.attn.o.{p}"),
    ("transformer.layer.{i}.sa_layer_norm.{p}", "blocks.{i}.norm1.{p}"),
    ("transformer.layer.{i}.ffn.lin1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("transformer.layer.{i}.ffn.lin2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("transformer.layer.{i}.output_layer_norm.{p}", "blocks.{i}.norm2.{p}"),
]
_NAMES["modernbert"] = [  # Wqkv and Wi are fused (FUSED below); Wi's halves are GeGLU's act input, then its gate
    ("embeddings.tok_embeddings.weight", "embed.tok.weight"),
    ("embeddings.norm.{p}", "embed.norm.{p}"),
    ("layers.{i}.attn_norm.{p}", "blocks.{i}.norm1.{p}"),
    ("layers.{i}.attn.Wo.{p}", "blocks.{i}.attn.o.{p}"),
    ("layers.{i}.mlp_norm.{p}", "blocks.{i}.norm2.{p}"),
    ("layers.{i}.mlp.Wo.{p}", "blocks.{i}.mlp.down.{p}"),
    ("final_norm.{p}", "norm.{p}"),
]
# HF prefix of the backbone inside task models, per family.
_PREFIX = {"llama": "model.", "mistral": "model.", "mixtral": "model.", "qwen2": "model.", "qwen3": "model.",
           "qwen3_moe": "model.", "olmo2": "model.",
           "phi3": "model.", "gemma2": "model.", "gemma3": "model.", "gpt2": "transformer.", "bert": "bert.",
           "roberta": "roberta.", "xlm-roberta": "roberta.", "distilbert": "distilbert.", "modernbert": "model."}
_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "modernbert")  # saved bare (BertModel, ...): no prefix
# roberta's classification head is dense + tanh + out_proj: the dense layer is our pooler, out_proj our score
_ROBERTA_HEAD = {"classifier.dense.weight": "pooler.weight", "classifier.dense.bias": "pooler.bias"}
_DISTILBERT_HEAD = {"pre_classifier.weight": "pooler.weight", "pre_classifier.bias": "pooler.bias"}  # + relu
# ModernBertPredictionHead (dense -> act -> LayerNorm), in every ModernBERT task model outside its `model.`
_MODERNBERT_HEAD = {"head.dense.weight": "pooler.weight", "head.dense.bias": "pooler.bias",
                    "head.norm.weight": "pooler_norm.weight", "head.norm.bias": "pooler_norm.bias"}
_POOLER_NAMES = {"roberta": _ROBERTA_HEAD, "xlm-roberta": _ROBERTA_HEAD, "distilbert": _DISTILBERT_HEAD,
                 "modernbert": _MODERNBERT_HEAD}  # families whose task head holds our pooler
# fused HF tensors of a family: HF module -> (our modules, in the order they are stacked along the output dim)
FUSED = {"phi3": {"layers.{i}.self_attn.qkv_proj": ("blocks.{i}.attn.q", "blocks.{i}.attn.k", "blocks.{i}.attn.v"),
                  "layers.{i}.mlp.gate_up_proj": ("blocks.{i}.mlp.gate", "blocks.{i}.mlp.up")},
         "modernbert": {"layers.{i}.attn.Wqkv": ("blocks.{i}.attn.q", "blocks.{i}.attn.k", "blocks.{i}.attn.v"),
                        "layers.{i}.mlp.Wi": ("blocks.{i}.mlp.gate", "blocks.{i}.mlp.up")}}
# task-head tensors: HF name -> our name (outside the backbone)
_HEADS = {"score.weight": "score.weight", "score.bias": "score.bias",
          "classifier.weight": "score.weight", "classifier.bias": "score.bias",
          "qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"}
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|position_ids|rotary_emb\.inv_freq)$|^cls\.")
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _regex(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    pat = pat.replace(r"\{e\}", r"(?P<e>\d+)")  # an expert's index
    return re.compile("^" + pat + "$")


_COMPILED = {fam: [(_regex(h), h, o) for h, o in names] for fam, names in _NAMES.items()}
_FUSED_RX = {fam: [(_regex(h + ".{p}"), h, parts) for h, parts in table.items()] for fam, table in FUSED.items()}


def fused_sizes(cfg: ModelConfig, parts: tuple[str, ...]) -> list[int]:
    """Output rows of each of our modules stacked in one fused HF tensor (q/k/v or gate/up)."""
    assert cfg.head_dim is not None and cfg.n_kv_heads is not None
    rows = {"q": cfg.n_heads * cfg.head_dim, "k": cfg.n_kv_heads * cfg.head_dim, "v": cfg.n_kv_heads * cfg.head_dim,
            "gate": cfg.d_ff, "up": cfg.d_ff}
    return [rows[p.rsplit(".", 1)[1]] for p in parts]
_REVERSE = {fam: [(_regex(o), h) for h, o in names] for fam, names in _NAMES.items()}  # ours -> HF


def strip_prefix(name: str, family: str) -> tuple[str, bool]:
    """Remove the backbone prefix (model., transformer., bert., model.language_model.); True if it was one."""
    for pre in ("model.language_model.", "language_model.model.", _PREFIX[family]):
        if name.startswith(pre):
            return name[len(pre):], True
    return name, False


# ---- module names (what PEFT adapter files use) ---------------------------------------------------
def hf_prefix(family: str, has_heads: bool) -> str:
    """The backbone prefix save_pretrained writes: none for a bare BERT, else model. / transformer. / bert."""
    return "" if family in _ENCODERS and not has_heads else _PREFIX[family]


def hf_module_name(family: str, ours: str) -> str:
    """Backbone-relative module name -> HF module path without prefix (gpt2 q/k/v -> the fused c_attn)."""
    if family == "gpt2":
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.[qkv]", ours)
        if m:
            return f"h.{m.group(1)}.attn.c_attn"
    for hf_t, parts in FUSED.get(family, {}).items():
        if any(re.fullmatch(_regex(p).pattern[1:-1], ours) for p in parts):
            raise CheckpointError(f"{ours}: {family} stores it fused in {hf_t.split('.')[-1]}, which a PEFT adapter of "
                                  "its parts cannot name: export the merged model instead (lmforge export)")
    for rx, hf_t in _REVERSE[family]:
        m = rx.match(ours + ".weight")
        if m:
            return hf_t.format(**m.groupdict())[: -len(".weight")]
    raise CheckpointError(f"internal: no HF module name for {ours!r} of family {family!r}")


def module_from_hf(family: str, hf_path: str) -> str | None:
    """HF module path (any backbone prefix) -> backbone-relative name; gpt2 c_attn -> 'blocks.N.attn.qkv'."""
    rel, _ = strip_prefix(hf_path, family)
    if family == "gpt2":
        m = re.fullmatch(r"h\.(\d+)\.attn\.c_attn", rel)
        if m:
            return f"blocks.{m.group(1)}.attn.qkv"
    for rx, _h, ours_t in _COMPILED[family]:
        m = rx.match(rel + ".weight")
        if m:
            return ours_t.format(**m.groupdict())[: -len(".weight")]
    return None


def head_hf_name(family: str, name: str) -> str:
    """Our task-head tensor name -> its HF name (BERT's classifier is `classifier`, ours `score`)."""
    if family in ("bert", "distilbert", "modernbert") and name.startswith("score."):
        return "classifier." + name[len("score."):]  # Bert/DistilBertForSequenceClassification's name
    if family == "modernbert" and name.startswith("qa_outputs."):
        return "classifier." + name[len("qa_outputs."):]  # ModernBertForQuestionAnswering's name
    if family in ("roberta", "xlm-roberta") and name.startswith("score."):
        return "classifier.out_proj." + name[len("score."):]
    return name


def head_from_hf(hf_name: str) -> str | None:
    """A HF task-head tensor name (score / classifier / qa_outputs) -> ours; None if it is not a head tensor."""
    return _HEADS.get(hf_name)


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor], source: str = "") -> tuple[dict, dict]:
    """HF tensors -> (backbone state dict, head state dict) in our names; unknown names are an error."""
    fam = cfg.family
    body: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    roberta = fam in ("roberta", "xlm-roberta")
    pooler_names = _POOLER_NAMES.get(fam, {})
    for name, t in hf.items():
        if name in pooler_names:
            body[pooler_names[name]] = t
            continue
        if roberta and name.startswith("classifier.out_proj."):
            heads["score." + name.rsplit(".", 1)[1]] = t
            continue
        if name in _HEADS:
            heads[_HEADS[name]] = t
            continue
        if not cfg.causal and name.startswith("lm_head.") or fam == "modernbert" and name.startswith("decoder."):
            continue  # an encoder's masked-LM head (roberta): not part of the backbone, nor of our heads
        if name == "lm_head.weight":
            body["lm_head.weight"] = t
            continue
        rel, _ = strip_prefix(name, fam)
        rel = rel.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if _IGNORED.search(rel):
            continue
        if fam == "gpt2":
            m = re.match(r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$", rel)
            if m:  # fused qkv, Conv1D layout (D, 3D)
                i, p = m.groups()
                parts = (t.t() if p == "weight" else t).chunk(3, dim=0)
                for key, part in zip("qkv", parts):
                    body[f"blocks.{i}.attn.{key}.{p}"] = part.contiguous()
                continue
        fused = next(((m, parts) for rx, _h, parts in _FUSED_RX.get(fam, ()) if (m := rx.match(rel))), None)
        if fused is not None:  # one HF tensor stacking several of our modules along the output dim
            m, parts = fused
            sizes = fused_sizes(cfg, parts)
            if t.shape[0] != sum(sizes):
                raise CheckpointError(f"{source or 'checkpoint'}: {name} has {t.shape[0]} rows, the config gives "
                                      f"{sum(sizes)} ({' + '.join(map(str, sizes))})")
            for part, piece in zip(parts, t.split(sizes, dim=0)):
                body[part.format(**m.groupdict()) + "." + m.group("p")] = piece.contiguous()
            continue
        for rx, _h, ours in _COMPILED[fam]:
            m = rx.match(rel)
            if m:
                out = ours.format(**m.groupdict())
                body[out] = t.t().contiguous() if fam == "gpt2" and _CONV1D.match(rel) else t
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(
            f"{source or 'checkpoint'}: {len(unknown)} tensor(s) not understood for family {fam!r}, "
            f"e.g. {unknown[0]!r}"
        )
    if cfg.tie_embeddings:
        body.pop("lm_head.weight", None)
    return body, heads


def to_hf_state_dict(cfg: ModelConfig, body: dict[str, torch.Tensor], heads: dict[str, torch.Tensor] | None = None,
                     with_prefix: bool = True) -> dict[str, torch.Tensor]:
    """Our backbone (+ head) tensors -> HF names, as the Auto classes expect them on disk."""
    fam = cfg.family
    reverse = _REVERSE[fam]
    prefix = _PREFIX[fam] if with_prefix else ""
    if fam in _ENCODERS and not heads:
        prefix = ""  # BertModel / RobertaModel keep no prefix
    out: dict[str, torch.Tensor] = {}
    to_head = {}
    if heads and fam in _POOLER_NAMES:  # their classifiers hold the pooler's dense
        to_head = {v: k for k, v in _POOLER_NAMES[fam].items()}
    for name, t in body.items():
        if fam == "modernbert" and name.startswith("pooler") and not to_head:
            continue  # ModernBertModel has no head (a masked-LM checkpoint's head.* loaded as our pooler)
        if name == "lm_head.weight":
            out["lm_head.weight"] = t
            continue
        if name in to_head:  # RobertaForSequenceClassification has no pooler: its classifier.dense is ours
            out[to_head[name]] = t.contiguous()
            continue
        if fam == "gpt2":
            m = re.match(r"^blocks\.(\d+)\.attn\.([qkv])\.(weight|bias)$", name)
            if m:
                continue  # fused below
        if any(re.fullmatch(_regex(p + ".{p}").pattern[1:-1], name) for parts in FUSED.get(fam, {}).values()
               for p in parts):
            continue  # fused below
        for rx, h in reverse:
            m = rx.match(name)
            if m:
                hf_name = h.format(**m.groupdict())
                conv = fam == "gpt2" and _CONV1D.match(hf_name)
                out[prefix + hf_name] = (t.t() if conv else t).contiguous()
                break
        else:
            raise CheckpointError(f"internal: no HF name for tensor {name!r} of family {fam!r}")
    for hf_t, parts in FUSED.get(fam, {}).items():  # Phi-3's qkv_proj and gate_up_proj
        for i in range(cfg.n_layers):
            for p in ("weight", "bias"):
                names = [part.format(i=i) + "." + p for part in parts]
                if all(n in body for n in names):
                    out[prefix + hf_t.format(i=i) + "." + p] = torch.cat([body[n] for n in names], 0).contiguous()
    if fam == "gpt2":
        for i in range(cfg.n_layers):
            w = torch.cat([body[f"blocks.{i}.attn.{k}.weight"] for k in "qkv"], 0)  # (3D, D)
            b = torch.cat([body[f"blocks.{i}.attn.{k}.bias"] for k in "qkv"], 0)
            out[f"{prefix}h.{i}.attn.c_attn.weight"] = w.t().contiguous()  # Conv1D (D, 3D)
            out[f"{prefix}h.{i}.attn.c_attn.bias"] = b.contiguous()
    for name, t in (heads or {}).items():
        out[head_hf_name(fam, name)] = t.contiguous()
    return out


# ---- reading a directory -------------------------------------------------------------------------
def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise ModelNotFoundError(f"{path}: no config.json in this directory (not a Hugging Face model dir)")
    return ModelConfig.load(f)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: model.safetensors, sharded safetensors, or pytorch_model.bin.

    Other *.safetensors files there (a stray copy, shards no index names) are not loaded: one warning names
    them, since silently loading or ignoring a second weight file can both be wrong. Files lmforge or PEFT
    keep beside a model (LoRA adapters, the QA teacher-logit cache) are expected there and not named."""
    import logging

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    companions = {"adapter_model.safetensors", "teacher_logits.safetensors"}  # peft.ADAPTER_WEIGHTS, qa's cache
    present = sorted(f.name for f in path.glob("*.safetensors") if f.is_file()) if path.is_dir() else []

    def warn_unused(used: set[str], source: str) -> None:
        unused = [n for n in present if n not in used and n not in companions]
        if unused:
            logging.getLogger("lmforge").warning("%s: ignoring %s (not loaded: the weights come from %s)", path,
                                                 ", ".join(unused), source)

    if single.is_file():
        warn_unused({single.name}, single.name + (f", not {index.name}" if index.is_file() else ""))
        return load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            if not (path / s).is_file():
                raise CheckpointError(f"{index}: names shard {s!r}, which is missing")
            sd.update(load_safetensors(path / s))
        warn_unused(set(shards), f"the shards {index.name} names")
        return sd
    binf = path / "pytorch_model.bin"
    if binf.is_file():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncated files
            raise CheckpointError(f"{binf}: cannot be read safely with weights_only=True ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        warn_unused(set(), binf.name)
        return sd
    found = [n for n in present if n not in companions]
    seen = f"; found {', '.join(found[:5])}, which no index names" if found else ""
    raise CheckpointError(f"{path}: no weights found (model.safetensors, an index, or pytorch_model.bin){seen}")


def load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: unreadable safetensors file, truncated or corrupt ({msg})") from None


# ---- loading into modules ------------------------------------------------------------------------
def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """load_state_dict with errors that name the tensor and both shapes."""
    own = module.state_dict()
    for name, t in sd.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but the config "
                f"gives {tuple(own[name].shape)}"
            )
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if strict and (missing or extra):
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: checkpoint does not match the config: {what}")
    with torch.no_grad():
        for name, t in sd.items():
            if name in own:
                own[name].copy_(t.to(own[name].dtype))


# ---- saving ---------------------------------------------------------------------------------------
def save_hf(path: Path, cfg: ModelConfig, body: dict, heads: dict | None = None,
            extra_config: dict[str, Any] | None = None, tokenizer=None) -> None:
    """config.json + model.safetensors (+ tokenizer files) that transformers' Auto classes load.

    Each file is written to a temp name and renamed; the weights go first and config.json last, so a
    directory with a config.json always has complete weights. Other files in `path` are left alone.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(cfg, body, heads, with_prefix=bool(heads) or cfg.family not in _ENCODERS)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path / "model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(path)
    hf_cfg = cfg.to_hf()
    if cfg.family == "modernbert" and heads and "qa_outputs.weight" in heads:  # its span layer is `classifier`:
        hf_cfg["architectures"] = ["ModernBertForQuestionAnswering"]  # the architecture tells it from a classifier
    hf_cfg.update(extra_config or {})
    hf_cfg["dtype"] = str(next(iter(body.values())).dtype).replace("torch.", "")
    atomic_write(path / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
