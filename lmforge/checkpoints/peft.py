"""LoRA adapter files in the PEFT layout: `adapter_model.safetensors` + `adapter_config.json`.

Names are `base_model.model.<HF module>.lora_A.weight`, so `peft.PeftModel` loads them on the model that
`save_pretrained` writes, and plain PEFT LoRA dirs for our families load here. GPT-2's fused `c_attn` gets
one LoRA whose A stacks the q/k/v A's and whose B is block-diagonal (rank n*r, alpha n*alpha, so the scale
is unchanged); our own split is kept in the safetensors header so `load_adapters` restores the exact
per-projection adapters. The torch side (LoraLinear, injection) lives in lmforge.model.lora.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoints.hf import (
    head_from_hf,
    head_hf_name,
    hf_module_name,
    hf_prefix,
    load_safetensors,
    module_from_hf,
    strip_prefix,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write
from lmforge.model.lora import (
    LORA_TARGETS,
    LoraConfig,
    LoraLinear,
    freeze_for_lora,
    inject_adapters,
    lora_candidates,
    lora_config_of,
    split_backbone,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_adapters", "save_adapters"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_META_KEY = "lmforge_lora"  # safetensors header entry with our own (exact) description of the adapters
_PEFT_PREFIX = "base_model.model."


# ---- saving --------------------------------------------------------------------------------------
def _short_suffixes(targeted: set[str], every: set[str]) -> list[str]:
    """Shortest dotted suffix of each targeted path that matches no untargeted path (PEFT target_modules)."""
    out = []
    for path in sorted(targeted):
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suf = ".".join(parts[-k:])
            hits = {p for p in every if p == suf or p.endswith("." + suf)}
            if hits <= targeted:
                break
        if suf not in out:
            out.append(suf)
    return out


def _task_type(model: nn.Module, family: str) -> str:
    if hasattr(model, "score"):
        return "SEQ_CLS"
    if hasattr(model, "qa_outputs"):
        return "QUESTION_ANS"
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


def save_adapters(model: nn.Module, path: str | Path, cfg: LoraConfig | None = None,
                  base_model: str | Path | None = None, revision: str | None = None) -> Path:
    """Write only the adapters (+ head tensors): PEFT-layout adapter_model.safetensors + adapter_config.json.

    `base_model` (a built-in name, directory or hub id) is recorded as `base_model_name_or_path`. Other
    files already in `path` are left alone.
    """
    backbone, prefix = split_backbone(model)
    cfg = cfg or lora_config_of(model)
    if cfg is None:
        raise ConfigError("save_adapters: no LoraConfig given and the model was not set up by inject_lora")
    family = backbone.cfg.family
    loras = {n: m for n, m in backbone.named_modules() if isinstance(m, LoraLinear)}
    if not loras:
        raise ConfigError("save_adapters: the model has no LoRA adapters (inject_lora first)")
    heads = {n: t.detach() for n, t in model.state_dict().items() if prefix and not n.startswith(prefix)}
    pre = _PEFT_PREFIX + hf_prefix(family, bool(heads))
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fused: dict[str, list[str]] = {}  # gpt2 c_attn path -> which of q/k/v it stacks, in order
    for name, m in loras.items():
        hf = hf_module_name(family, name)
        if hf.endswith(".c_attn"):
            fused.setdefault(hf, []).append(name.rsplit(".", 1)[-1])
            continue
        if m.rank != cfg.rank or m.alpha != float(cfg.alpha):
            rank_pattern[hf], alpha_pattern[hf] = m.rank, m.alpha
        tensors[f"{pre}{hf}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"{pre}{hf}.lora_B.weight"] = m.lora_B.detach()
    for hf, parts in fused.items():
        parts.sort(key="qkv".index)
        layer = hf.split(".")[1]
        mods = [loras[f"blocks.{layer}.attn.{p}"] for p in parts]
        if len({(m.rank, m.scale) for m in mods}) != 1:
            raise CheckpointError(f"save_adapters: q/k/v adapters of layer {layer} differ in rank or scale; "
                                  "GPT-2's fused c_attn needs them equal")
        r, d = mods[0].rank, mods[0].out_features
        a = torch.cat([m.lora_A.detach() for m in mods], 0)  # (n*r, D)
        b = torch.zeros(3 * d, r * len(mods), dtype=a.dtype, device=a.device)  # (3D, n*r), block-diagonal
        for j, (p, m) in enumerate(zip(parts, mods, strict=True)):
            i = "qkv".index(p)
            b[i * d:(i + 1) * d, j * r:(j + 1) * r] = m.lora_B.detach()
        tensors[f"{pre}{hf}.lora_A.weight"] = a
        tensors[f"{pre}{hf}.lora_B.weight"] = b
        rank_pattern["c_attn"], alpha_pattern["c_attn"] = r * len(mods), mods[0].alpha * len(mods)
    for n, t in heads.items():
        tensors[_PEFT_PREFIX + head_hf_name(family, n)] = t
    # PEFT target_modules: short suffixes that hit exactly the adapted HF modules
    all_hf = {hf_module_name(family, n) for n in lora_candidates(backbone)}
    all_hf |= {head_hf_name(family, n).rsplit(".", 1)[0] for n in heads} | {"lm_head"}
    if family == "bert":
        all_hf.add("pooler.dense")  # a Linear that a bare 'dense' suffix would also hit
    targeted = {hf_module_name(family, n) for n in loras}
    head_modules = sorted({head_hf_name(family, n).rsplit(".", 1)[0] for n in heads})
    meta = {
        "family": family, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
        "targets": list(cfg.targets), "fused_qkv": fused,
        "modules": sorted(loras), "heads": sorted(heads),
    }
    peft_cfg: dict[str, Any] = {
        "peft_type": "LORA", "task_type": _task_type(model, family),
        "base_model_name_or_path": str(base_model) if base_model is not None else None, "revision": revision,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": _short_suffixes(targeted, all_hf), "modules_to_save": head_modules or None,
        "fan_in_fan_out": family == "gpt2", "bias": "none", "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: v.cpu().contiguous() for k, v in tensors.items()}
    atomic_write(out / ADAPTER_WEIGHTS, lambda f: save_file(
        payload, str(f), metadata={"format": "pt", _META_KEY: json.dumps(meta)}))
    atomic_write(out / ADAPTER_CONFIG, json.dumps(peft_cfg, indent=2) + "\n")
    return out


# ---- loading -------------------------------------------------------------------------------------
def _read_adapter_config(d: Path) -> dict[str, Any]:
    f = d / ADAPTER_CONFIG
    if not f.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_CONFIG} in this directory (not a LoRA adapter dir)")
    try:
        c = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(c).__name__}")
    if c.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{f}: field 'peft_type' is {c.get('peft_type')!r}; only LORA adapters load")
    for key in ("use_dora", "use_rslora"):
        if c.get(key):
            raise CheckpointError(f"{f}: field {key!r} is set; only plain LoRA is supported")
    for key in ("r", "lora_alpha"):
        v = c.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"{f}: field {key!r} must be a positive number, got {v!r}")
    return c


def _pattern(patterns: dict[str, Any], hf_path: str, default: Any) -> Any:
    for key, v in (patterns or {}).items():  # PEFT's rule: the key matches a dotted suffix of the path
        if re.match(rf"(.*\.)?({key})$", hf_path):
            return v
    return default


def load_adapters(model: nn.Module, path: str | Path) -> list[str]:
    """Inject adapters as described by `path` (unless the model already has matching ones) and load them.

    Reads what save_adapters writes and plain PEFT LoRA dirs for our families. Returns the adapted module
    names (relative to `model`). Unknown tensor names and shape mismatches are CheckpointErrors naming the
    file and the tensor.
    """
    d = Path(path)
    pc = _read_adapter_config(d)
    wfile = d / ADAPTER_WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS} in this directory")
    raw = load_safetensors(wfile)
    with safe_open(str(wfile), framework="pt") as f:
        meta_s = (f.metadata() or {}).get(_META_KEY)
    meta = json.loads(meta_s) if meta_s else None
    backbone, prefix = split_backbone(model)
    family = backbone.cfg.family
    if meta and meta.get("family") != family:
        raise CheckpointError(f"{wfile}: adapters were trained on a {meta.get('family')} model, "
                              f"this model is {family}")
    r0, a0 = int(pc["r"]), float(pc["lora_alpha"])
    own = dict(model.named_parameters())

    # group tensors per module: our module name -> {"A": (file name, tensor), "B": ...}
    loras: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    hf_of: dict[str, str] = {}
    heads: dict[str, tuple[str, torch.Tensor]] = {}
    for key, t in raw.items():
        rest = key.removeprefix(_PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", rest)
        if m:
            ours = module_from_hf(family, m.group(1))
            if ours is None:
                raise CheckpointError(f"{wfile}: tensor {key!r} targets a module unknown to the "
                                      f"{family} model")
            loras.setdefault(ours, {})[m.group(2)] = (key, t)
            hf_of[ours] = m.group(1)
            continue
        head = head_from_hf(rest)
        if head is None:
            raise CheckpointError(f"{wfile}: tensor {key!r} is not a LoRA or task-head tensor")
        if not prefix or head not in own:
            raise CheckpointError(f"{wfile}: tensor {key!r} is for a task head ({head}) this model lacks")
        heads[head] = (key, t)
    for ours, ab in loras.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{wfile}: module {hf_of[ours]!r} has lora_{'A' if 'B' in ab else 'B'} "
                                  f"missing")

    # per-module (rank, alpha, A, B); gpt2's fused c_attn split back into q/k/v
    tensors: dict[str, tuple[int, float, torch.Tensor, torch.Tensor, str]] = {}
    for ours, ab in loras.items():
        (ka, a), (kb, b) = ab["A"], ab["B"]
        hf = hf_of[ours]
        r = int(_pattern(pc.get("rank_pattern"), hf, r0))
        alpha = float(_pattern(pc.get("alpha_pattern"), hf, a0))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise CheckpointError(f"{wfile}: tensors {ka!r} {tuple(a.shape)} and {kb!r} {tuple(b.shape)} "
                                  f"do not form a rank-{r} adapter")
        if not ours.endswith(".qkv"):
            tensors[ours] = (r, alpha, a, b, ka)
            continue
        base = ours[: -len("qkv")]
        dm = b.shape[0] // 3
        parts = (meta or {}).get("fused_qkv", {}).get(strip_prefix(hf, family)[0])
        if parts:  # ours: stacked A's and a block-diagonal B, split exactly
            n = len(parts)
            if r % n:
                raise CheckpointError(f"{wfile}: tensor {ka!r} rank {r} does not split over {parts}")
            rr = r // n
            for j, p in enumerate(parts):
                i = "qkv".index(p)
                tensors[base + p] = (rr, alpha / n, a[j * rr:(j + 1) * rr],
                                     b[i * dm:(i + 1) * dm, j * rr:(j + 1) * rr], ka)
        else:  # foreign PEFT: one shared A, B rows split between q, k, v (exact, rank r each)
            for i, p in enumerate("qkv"):
                tensors[base + p] = (r, alpha, a, b[i * dm:(i + 1) * dm], ka)

    # inject (or check the existing adapters), then copy
    cands = lora_candidates(backbone)
    for ours, (_r, _al, a, b, key) in tensors.items():
        mod = cands.get(ours)
        if mod is None:
            raise CheckpointError(f"{wfile}: tensor {key!r} targets {prefix + ours!r}, which this "
                                  "model lacks")
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            raise CheckpointError(f"{wfile}: tensor {key!r} gives a ({b.shape[0]}x{a.shape[1]}) update but "
                                  f"layer {prefix + ours!r} is ({mod.out_features}x{mod.in_features})")
    existing = {n for n, m in cands.items() if isinstance(m, LoraLinear)}
    if existing:
        if existing != set(tensors):
            raise CheckpointError(f"{wfile}: adapters cover {len(tensors)} layers but the model already has "
                                  f"adapters on {len(existing)} others (use a model without LoRA)")
        for n in existing:
            m = cands[n]
            if m.rank != tensors[n][0] or not math.isclose(m.scale, tensors[n][1] / tensors[n][0]):
                raise CheckpointError(f"{wfile}: adapter of {prefix + n!r} has rank {tensors[n][0]}, the "
                                      f"model's has rank {m.rank} (or a different alpha)")
        freeze_for_lora(model)
        names = [prefix + n for n in cands if n in existing]
    else:
        plan = {n: (tensors[n][0], tensors[n][1]) for n in cands if n in tensors}
        names = inject_adapters(model, plan, float(pc.get("lora_dropout") or 0.0), _config_from(meta, pc, plan))
    for n, (_r, _al, a, b, _k) in tensors.items():
        m = backbone.get_submodule(n)
        with torch.no_grad():
            m.lora_A.copy_(a.to(m.lora_A.dtype))
            m.lora_B.copy_(b.to(m.lora_B.dtype))
    for head, (key, t) in heads.items():
        p = own[head]
        if tuple(p.shape) != tuple(t.shape):
            raise CheckpointError(f"{wfile}: tensor {key!r} has shape {tuple(t.shape)} but the model's "
                                  f"{head!r} is {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
    return names


def _config_from(meta: dict | None, pc: dict[str, Any], plan: dict[str, tuple[int, float]]) -> LoraConfig:
    """The LoraConfig to re-save with: ours from the header, else rebuilt from the adapted layers."""
    if meta:
        return LoraConfig(meta["rank"], meta["alpha"], meta.get("dropout", 0.0), tuple(meta["targets"]))
    targets = tuple(t for t in LORA_TARGETS if any(n.rsplit(".", 1)[-1] == t for n in plan))
    r, alpha = next(iter(plan.values())) if plan else (int(pc["r"]), float(pc["lora_alpha"]))
    return LoraConfig(r, alpha, float(pc.get("lora_dropout") or 0.0), targets)

