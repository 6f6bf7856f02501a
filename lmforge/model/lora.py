"""LoRA by composition: wrap chosen nn.Linear layers, train only the low-rank adapters (+ the task head).

Design choices:
- `LoraLinear` keeps the base layer's own `weight`/`bias` Parameters (the same objects, no copy) under the
  same state-dict names as the nn.Linear it replaces, and adds `lora_A` (r, in) and `lora_B` (out, r). So
  `blocks.0.attn.q.weight` keeps its name, a training checkpoint is the old state dict plus `*.lora_A/B`, and
  code that reads `module.weight` keeps working.
- Adapters are kept in float32 (or wider) even on a bf16/fp16 base: they are the master weights of the
  only thing being trained. They are cast to the input dtype inside forward.
- On disk (`save_adapters`) we write the PEFT layout: `adapter_model.safetensors` with names
  `base_model.model.<HF module>.lora_A.weight` and an `adapter_config.json` that `peft.PeftModel` reads on
  the model `save_pretrained` writes. GPT-2's fused `c_attn` gets one LoRA whose A stacks the q/k/v A's and
  whose B is block-diagonal (rank n*r, alpha n*alpha, so the scale is unchanged); our own split is kept in
  the safetensors header so `load_adapters` restores the exact per-projection adapters.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoints.hf import (
    _COMPILED,
    _HEADS,
    _NAMES,
    _PREFIX,
    _load_safetensors,
    _regex,
    _strip_prefix,
)
from lmforge.errors import CheckpointError, ConfigError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LORA_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "has_lora",
    "inject_lora",
    "load_adapters",
    "lora_state_dict",
    "merge_lora",
    "save_adapters",
    "trainable_parameters",
]

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_META_KEY = "lmforge_lora"  # safetensors header entry with our own (exact) description of the adapters
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    """Rank, scale (alpha / rank), dropout on the adapter input, and which block linears get adapters.

    `targets` are our short module names (q, k, v, o, gate, up, down, fc1, fc2) or "all-linear"; a
    comma-separated string such as "q,v" (the CLI form) is accepted too.
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        t = self.targets
        names = [s.strip() for s in t.split(",")] if isinstance(t, str) else [str(s).strip() for s in t]
        names = [s for s in names if s]
        if not names:
            raise ConfigError("LoRA field 'targets': empty (give e.g. q,v or all-linear)")
        if "all-linear" in names:
            names = list(LORA_TARGETS)
        bad = [s for s in names if s not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"LoRA field 'targets': unknown module {bad[0]!r} "
                              f"(valid: {', '.join(LORA_TARGETS)}, all-linear)")
        self.targets = tuple(dict.fromkeys(names))  # dedup, keep order
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA field 'rank': must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ConfigError(f"LoRA field 'alpha': must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA field 'dropout': must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank, with W, b the wrapped layer's own Parameters.

    A is kaiming-uniform and B zero, so a freshly wrapped layer computes exactly what the base layer did.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in): the same Parameter object, so nothing is copied
        self.register_parameter("bias", base.bias)  # (out,) or None
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        w = base.weight
        dtype = torch.promote_types(w.dtype, torch.float32) if w.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, device=w.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) use for A
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out); no data-dependent branches, so torch.compile traces one graph
        y = F.linear(x, self.weight, self.bias)
        a = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scale in float32: (out, in), what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded in (reusing this layer's weight/bias Parameters)."""
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha:g}")


# ---- injection -----------------------------------------------------------------------------------
def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """(backbone, its name prefix inside `model`): a Transformer or a task model holding `.backbone`."""
    bb = getattr(model, "backbone", None)
    if isinstance(bb, nn.Module):
        return bb, "backbone."
    if not hasattr(model, "blocks"):
        raise ConfigError(f"LoRA: {type(model).__name__} is neither a Transformer nor a task model "
                          "with .backbone")
    return model, ""


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def _candidates(backbone: nn.Module) -> dict[str, nn.Module]:
    """Block linears LoRA may wrap: backbone-relative name -> module (nn.Linear or LoraLinear)."""
    out = {}
    for name, m in backbone.named_modules():
        if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in LORA_TARGETS \
                and isinstance(m, (nn.Linear, LoraLinear)):
            out[name] = m
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _freeze(model: nn.Module) -> None:
    """Backbone frozen except the adapters; everything outside the backbone (task heads) trainable."""
    backbone, _ = _backbone(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for m in backbone.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


def _inject_plan(model: nn.Module, plan: dict[str, tuple[int, float]], dropout: float) -> list[str]:
    """Wrap the backbone modules named in `plan` (name -> (rank, alpha)); returns names relative to model."""
    backbone, prefix = _backbone(model)
    cands = _candidates(backbone)
    done = []
    for name, (rank, alpha) in plan.items():
        m = cands.get(name)
        if m is None:
            raise ConfigError(f"LoRA: the model has no linear layer {prefix + name!r}")
        if isinstance(m, LoraLinear):
            raise ConfigError(f"LoRA: layer {prefix + name!r} already has an adapter (merge_lora first)")
        _replace(backbone, name, LoraLinear(m, rank, alpha, dropout))
        done.append(prefix + name)
    _freeze(model)
    return done


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every targeted block linear in a LoraLinear and freeze the rest of the backbone.

    Returns the replaced module names (relative to `model`). A target that matches no layer of this model
    (say `fc1` on a llama, which has gate/up/down) is a ConfigError rather than a silent no-op.
    """
    backbone, _ = _backbone(model)
    if has_lora(backbone):
        raise ConfigError("LoRA: the model already has adapters (merge_lora or use a fresh model)")
    cands = _candidates(backbone)
    present = {n.rsplit(".", 1)[-1] for n in cands}
    explicit_all = set(cfg.targets) == set(LORA_TARGETS)
    missing = [t for t in cfg.targets if t not in present]
    if missing and not explicit_all:
        fam = getattr(getattr(backbone, "cfg", None), "family", "this")
        raise ConfigError(f"LoRA field 'targets': {missing[0]!r} matches no layer of this {fam} model "
                          f"(it has: {', '.join(t for t in LORA_TARGETS if t in present)})")
    plan = {n: (cfg.rank, cfg.alpha) for n in cands if n.rsplit(".", 1)[-1] in cfg.targets}
    names = _inject_plan(model, plan, cfg.dropout)
    model._lora_config = cfg  # remembered for save_adapters
    return names


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad (adapters + heads after inject_lora)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back.

    The result has exactly the state-dict names of a never-adapted model, so `save_pretrained` writes a
    normal HF checkpoint. With inplace=False the model is deep-copied first (e.g. to export mid-training).
    Parameter requires_grad flags are left as they were (the backbone stays frozen).
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, LoraLinear):
            _replace(model, name, m.merged())
    if "_lora_config" in model.__dict__:
        del model.__dict__["_lora_config"]
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors plus every tensor outside the backbone (task heads), named as in model.state_dict()."""
    _, prefix = _backbone(model)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith((".lora_A", ".lora_B")) or (prefix and not name.startswith(prefix)):
            out[name] = t.detach()
    return out


# ---- our names <-> HF/PEFT names -----------------------------------------------------------------
def _hf_prefix(family: str, has_heads: bool) -> str:
    return "" if family == "bert" and not has_heads else _PREFIX[family]  # as save_pretrained writes it


def _to_hf_module(family: str, ours: str) -> str:
    """Backbone-relative module name -> HF module path without prefix (gpt2 q/k/v -> the fused c_attn)."""
    if family == "gpt2":
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.[qkv]", ours)
        if m:
            return f"h.{m.group(1)}.attn.c_attn"
    for hf_t, ours_t in _NAMES[family]:
        m = _regex(ours_t).match(ours + ".weight")
        if m:
            return hf_t.format(**m.groupdict())[: -len(".weight")]
    raise CheckpointError(f"internal: no HF module name for {ours!r} of family {family!r}")


def _from_hf_module(family: str, hf_path: str) -> str | None:
    """HF module path (any backbone prefix) -> backbone-relative name; gpt2 c_attn -> 'blocks.N.attn.qkv'."""
    rel, _ = _strip_prefix(hf_path, family)
    if family == "gpt2":
        m = re.fullmatch(r"h\.(\d+)\.attn\.c_attn", rel)
        if m:
            return f"blocks.{m.group(1)}.attn.qkv"
    for rx, _h, ours_t in _COMPILED[family]:
        m = rx.match(rel + ".weight")
        if m:
            return ours_t.format(**m.groupdict())[: -len(".weight")]
    return None


def _head_hf_name(family: str, name: str) -> str:
    if family == "bert" and name.startswith("score."):
        return "classifier." + name[len("score."):]  # BertForSequenceClassification's name
    return name


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


def _write_atomic(path: Path, write) -> None:
    """Write to a temp file beside `path`, then rename: an interrupted save never leaves a half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapters(model: nn.Module, path: str | Path, cfg: LoraConfig | None = None,
                  base_model: str | Path | None = None, revision: str | None = None) -> Path:
    """Write only the adapters (+ head tensors): PEFT-layout adapter_model.safetensors + adapter_config.json.

    `base_model` (a built-in name, directory or hub id) is recorded as `base_model_name_or_path`. Other
    files already in `path` are left alone.
    """
    backbone, prefix = _backbone(model)
    cfg = cfg or model.__dict__.get("_lora_config")
    if cfg is None:
        raise ConfigError("save_adapters: no LoraConfig given and the model was not set up by inject_lora")
    family = backbone.cfg.family
    loras = {n: m for n, m in backbone.named_modules() if isinstance(m, LoraLinear)}
    if not loras:
        raise ConfigError("save_adapters: the model has no LoRA adapters (inject_lora first)")
    heads = {n: t.detach() for n, t in model.state_dict().items() if prefix and not n.startswith(prefix)}
    pre = _PEFT_PREFIX + _hf_prefix(family, bool(heads))
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fused: dict[str, list[str]] = {}  # gpt2 c_attn path -> which of q/k/v it stacks, in order
    for name, m in loras.items():
        hf = _to_hf_module(family, name)
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
        tensors[_PEFT_PREFIX + _head_hf_name(family, n)] = t
    # PEFT target_modules: short suffixes that hit exactly the adapted HF modules
    all_hf = {_to_hf_module(family, n) for n in _candidates(backbone)}
    all_hf |= {_head_hf_name(family, n).rsplit(".", 1)[0] for n in heads} | {"lm_head"}
    if family == "bert":
        all_hf.add("pooler.dense")  # a Linear that a bare 'dense' suffix would also hit
    targeted = {_to_hf_module(family, n) for n in loras}
    head_modules = sorted({_head_hf_name(family, n).rsplit(".", 1)[0] for n in heads})
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
    _write_atomic(out / ADAPTER_WEIGHTS, lambda f: save_file(
        payload, f, metadata={"format": "pt", _META_KEY: json.dumps(meta)}))
    _write_atomic(out / ADAPTER_CONFIG, lambda f: Path(f).write_text(json.dumps(peft_cfg, indent=2) + "\n"))
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
    raw = _load_safetensors(wfile)
    with safe_open(str(wfile), framework="pt") as f:
        meta_s = (f.metadata() or {}).get(_META_KEY)
    meta = json.loads(meta_s) if meta_s else None
    backbone, prefix = _backbone(model)
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
            ours = _from_hf_module(family, m.group(1))
            if ours is None:
                raise CheckpointError(f"{wfile}: tensor {key!r} targets a module unknown to the "
                                      f"{family} model")
            loras.setdefault(ours, {})[m.group(2)] = (key, t)
            hf_of[ours] = m.group(1)
            continue
        head = _HEADS.get(rest)
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
        parts = (meta or {}).get("fused_qkv", {}).get(_strip_prefix(hf, family)[0])
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
    cands = _candidates(backbone)
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
        _freeze(model)
        names = [prefix + n for n in cands if n in existing]
    else:
        plan = {n: (tensors[n][0], tensors[n][1]) for n in cands if n in tensors}
        names = _inject_plan(model, plan, float(pc.get("lora_dropout") or 0.0))
        model._lora_config = _config_from(meta, pc, plan)
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

