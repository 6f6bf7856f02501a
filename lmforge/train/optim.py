"""The optimizer and its schedule: AdamW parameter groups (no decay on norms, biases and embeddings; optional
layer-wise lr decay) and warmup + linear/cosine/constant decay of the learning rate."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmforge.errors import TrainingError
from lmforge.train.config import TrainConfig


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(m).__name__.lower()


def layer_depths(model: nn.Module) -> tuple[dict[int, int], int] | None:
    """Depth of each parameter of the first Transformer (a module with `embed` and `blocks`) in `model`:
    0 for the embeddings, i + 1 for block i, n_layers + 1 for everything else (final norm, pooler, heads).
    None when the model has no such layout."""
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and isinstance(getattr(m, "embed", None), nn.Module):
            depth = {id(p): 0 for p in m.embed.parameters()}
            for i, block in enumerate(blocks):
                depth.update({id(p): i + 1 for p in block.parameters()})
            return depth, len(blocks)
    return None


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: "decay" (matrices of linear/attention layers) and "no_decay" (norm weights,
    embeddings, biases and every other 1-D parameter). Decaying a norm gain or an embedding pulls it
    towards zero for no benefit; frozen parameters are left out.

    layer_decay < 1 (layer-wise lr decay): each group is also split by depth (layer_depths), and a
    parameter d levels below the top gets lr * layer_decay**d through the group's "lr_scale", so the
    pretrained lower layers move less than the new head. The top groups come first: the logged lr is theirs."""
    if not 0.0 < layer_decay <= 1.0:
        raise TrainingError(f"train config field 'layer_lr_decay': must be in (0, 1], got {layer_decay}")
    depths, top = ({}, 0)
    if layer_decay < 1.0:
        found = layer_depths(model)
        if found is None:
            raise TrainingError("train config field 'layer_lr_decay': the model has no embeddings + blocks "
                                "(Transformer) to count layers in")
        depths, n_layers = found
        top = n_layers + 1
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # an embedding tied to an output projection is seen first where it is defined: undecayed
    for module in model.modules():
        excluded = _is_norm(module) or isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            groups.setdefault((depths.get(id(p), top), excluded or p.ndim < 2), []).append(p)
    out = []
    for (depth, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        g = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "name": ("no_decay" if no_decay else "decay") + (f".{depth}" if layer_decay < 1.0 else "")}
        if layer_decay < 1.0:
            g["lr_scale"] = layer_decay ** (top - depth)
        out.append(g)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups(): fused kernel when the device supports it, else foreach."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay)
    if not groups:
        raise TrainingError("model: no trainable parameters (all have requires_grad=False)")
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = cfg.lr * g["lr_scale"]
    kw = {"lr": cfg.lr, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    for extra in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.AdamW(groups, **kw, **extra)  # type: ignore[arg-type]
        except (RuntimeError, ValueError, TypeError):
            continue
    raise TrainingError("model: cannot build AdamW over its parameters")  # pragma: no cover


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Warmup length in optimizer steps: cfg.warmup < 1 is a fraction of `total`, else a step count."""
    return int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        return lr_factor(step, cfg.schedule, w, total, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
