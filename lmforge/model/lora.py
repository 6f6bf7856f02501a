"""LoRA by composition: wrap chosen nn.Linear layers, train only the low-rank adapters (+ the task head).

Design choices:
- `LoraLinear` keeps the base layer's own `weight`/`bias` Parameters (the same objects, no copy) under the
  same state-dict names as the nn.Linear it replaces, and adds `lora_A` (r, in) and `lora_B` (out, r). So
  `blocks.0.attn.q.weight` keeps its name, a training checkpoint is the old state dict plus `*.lora_A/B`, and
  code that reads `module.weight` keeps working.
- Adapters are kept in float32 (or wider) even on a bf16/fp16 base: they are the master weights of the
  only thing being trained. They are cast to the input dtype inside forward.
- A quantized base layer (lmforge.quant's QuantLinear: int4/int8 integers) is kept whole as `base`, frozen,
  and its state keeps its own names (`blocks.0.attn.q.qweight`, not `...q.base.qweight`): LoRA over the
  integers a GGUF file holds, with gradients through them and no float copy of the model (QLoRA's idea).
- Only torch modules live here; the adapter files (PEFT layout) are read and written by
  `lmforge.checkpoints.peft`, which builds on `inject_adapters` / `lora_candidates` below.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError

__all__ = [
    "LORA_TARGETS",
    "LoraConfig",
    "LoraLinear",
    "freeze_for_lora",
    "has_lora",
    "inject_adapters",
    "inject_lora",
    "is_quantized_linear",
    "lora_candidates",
    "lora_config_of",
    "lora_state_dict",
    "merge_lora",
    "split_backbone",
    "trainable_parameters",
]

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2")


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


def is_quantized_linear(m: nn.Module) -> bool:
    """A quantized linear layer LoRA can wrap (lmforge.quant's QuantLinear), told by its interface: model/ sits
    below quant/ and does not import it."""
    return hasattr(m, "qweight") and callable(getattr(m, "dequantize", None)) and hasattr(m, "in_features")


class LoraLinear(nn.Module):
    """y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank, with W, b the wrapped layer's own Parameters, or
    y = base(x) + ... over a frozen quantized `base` (which then runs its own gradient path).

    A is kaiming-uniform and B zero, so a freshly wrapped layer computes exactly what the base layer did.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.base = None
            self.weight = base.weight  # (out, in): the same Parameter object, so nothing is copied
            self.register_parameter("bias", base.bias)  # (out,) or None
            w = base.weight
            device, wdtype = w.device, w.dtype
        elif is_quantized_linear(base):
            self.base = base  # frozen integers; state saved and loaded under this layer's names (hooks below)
            device, wdtype = base.qweight.device, base.dtype
            self._register_state_dict_hook(_flatten_base)
            self._register_load_state_dict_pre_hook(_nest_base, with_module=True)
        else:
            raise ConfigError(f"LoRA: cannot wrap a {type(base).__name__} (an nn.Linear or a quantized linear)")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        dtype = torch.promote_types(wdtype, torch.float32) if wdtype.is_floating_point else torch.float32
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) use for A
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out); no data-dependent branches, so torch.compile traces one graph
        y = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        a = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scale in float32: (out, in), what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded in (reusing this layer's weight/bias Parameters). Over a
        quantized base, a float layer: the dequantized weight plus the update (int4 cannot hold the sum)."""
        if self.base is not None:
            b = self.base
            with torch.no_grad():
                w = (b.dequantize(torch.float32) + self.delta_weight()).to(b.dtype)  # (out, in)
            with torch.device("meta"):
                lin = nn.Linear(self.in_features, self.out_features, bias=b.bias is not None)
            lin.weight = nn.Parameter(w, requires_grad=False)
            lin.bias = None if b.bias is None else nn.Parameter(b.bias.detach().clone(), requires_grad=False)
            return lin
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        bias = (self.base if self.base is not None else self).bias is not None
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={bias}, rank={self.rank}, alpha={self.alpha:g}")


def _flatten_base(module: LoraLinear, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: a quantized base's tensors under the layer's own names (`q.qweight`, as unadapted)."""
    for k in [k for k in state if k.startswith(prefix + "base.")]:
        state[prefix + k[len(prefix) + 5:]] = state.pop(k)


def _nest_base(module: LoraLinear, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the flat names back under `base.` (the inverse of _flatten_base)."""
    own = [n for n, _ in module.base.named_buffers(recurse=False)] + \
        [n for n, _ in module.base.named_parameters(recurse=False)]
    for name in own:
        if prefix + name in state:
            state[prefix + "base." + name] = state.pop(prefix + name)


# ---- injection -----------------------------------------------------------------------------------
def split_backbone(model: nn.Module) -> tuple[nn.Module, str]:
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


def lora_candidates(backbone: nn.Module) -> dict[str, nn.Module]:
    """Block linears LoRA may wrap: backbone-relative name -> module (nn.Linear or LoraLinear)."""
    out = {}
    for name, m in backbone.named_modules():
        if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in LORA_TARGETS \
                and (isinstance(m, (nn.Linear, LoraLinear)) or is_quantized_linear(m)):
            out[name] = m
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def freeze_for_lora(model: nn.Module) -> None:
    """Backbone frozen except the adapters; everything outside the backbone (task heads) trainable."""
    backbone, _ = split_backbone(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for p in backbone.parameters():
        p.requires_grad_(False)
    for m in backbone.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


def inject_adapters(model: nn.Module, plan: dict[str, tuple[int, float]], dropout: float,
                    cfg: LoraConfig) -> list[str]:
    """Wrap the backbone modules named in `plan` (name -> (rank, alpha)) and remember `cfg` for saving;
    returns names relative to model. Per-layer ranks let adapter files with PEFT rank patterns load."""
    backbone, prefix = split_backbone(model)
    cands = lora_candidates(backbone)
    done = []
    for name, (rank, alpha) in plan.items():
        m = cands.get(name)
        if m is None:
            raise ConfigError(f"LoRA: the model has no linear layer {prefix + name!r}")
        if isinstance(m, LoraLinear):
            raise ConfigError(f"LoRA: layer {prefix + name!r} already has an adapter (merge_lora first)")
        _replace(backbone, name, LoraLinear(m, rank, alpha, dropout))
        done.append(prefix + name)
    freeze_for_lora(model)
    model._lora_config = cfg  # read back through lora_config_of (save_adapters)
    return done


def inject_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every targeted block linear in a LoraLinear and freeze the rest of the backbone.

    Returns the replaced module names (relative to `model`). A target that matches no layer of this model
    (say `fc1` on a llama, which has gate/up/down) is a ConfigError rather than a silent no-op.
    """
    backbone, _ = split_backbone(model)
    if has_lora(backbone):
        raise ConfigError("LoRA: the model already has adapters (merge_lora or use a fresh model)")
    cands = lora_candidates(backbone)
    present = {n.rsplit(".", 1)[-1] for n in cands}
    explicit_all = set(cfg.targets) == set(LORA_TARGETS)
    missing = [t for t in cfg.targets if t not in present]
    if missing and not explicit_all:
        fam = getattr(getattr(backbone, "cfg", None), "family", "this")
        raise ConfigError(f"LoRA field 'targets': {missing[0]!r} matches no layer of this {fam} model "
                          f"(it has: {', '.join(t for t in LORA_TARGETS if t in present)})")
    plan = {n: (cfg.rank, cfg.alpha) for n in cands if n.rsplit(".", 1)[-1] in cfg.targets}
    return inject_adapters(model, plan, cfg.dropout, cfg)


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The LoraConfig the model's adapters were injected with (None without adapters or after merge_lora)."""
    return model.__dict__.get("_lora_config")


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
    _, prefix = split_backbone(model)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith((".lora_A", ".lora_B")) or (prefix and not name.startswith(prefix)):
            out[name] = t.detach()
    return out
