"""Mixture of experts: a router picks the top-k of E gated MLPs for each token, and their outputs are summed with
the router's weights (Mixtral, Qwen3-MoE). Each token runs only its experts, so a decode step reads only the
selected experts' weights: on a CPU, where decoding is bound by the bytes of weights read, the active and not the
total parameters set the speed."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.layers import GatedMLP


class MoE(nn.Module):
    """router (D -> E logits) -> softmax in float32 -> top-k -> (normalised) weights; experts: GatedMLP each."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.norm_topk = cfg.n_experts_active, cfg.moe_norm_topk
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(cfg, cfg.expert_d_ff) for _ in range(cfg.n_experts))
        # a decode token's k experts in two kernel calls (lmforge.quant.group_experts sets it on quantized
        # experts): (h (1, D), experts ascending, their weights (k,) float32) -> (1, D), or None for the loop
        self.grouped: nn.Module | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, D) -> the chosen experts (N, k) and their weights (N, k) in h's dtype."""
        probs = self.router(h).float().softmax(-1)  # (N, E)
        w, idx = probs.topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return idx, w.to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, D)
        h = x.reshape(-1, shape[-1])  # (N, D)
        idx, w = self.route(h)
        if self.grouped is not None and torch.jit.is_tracing():
            # a traced step (decode_hidden; verification rows) must record the routing, not one token's choice
            y = self.grouped.routed(h, idx, w)
            if y is None:
                raise RuntimeError("a mixture of experts is captured only where its experts run on lmforge's "
                                   "int4/int8 kernels")
            return y.view(shape)
        if h.shape[0] == 1:  # one token (a decode step): its k experts in ascending order, no gather / scatter
            order = sorted((e, j) for j, e in enumerate(idx[0].tolist()))
            if self.grouped is not None and h.dtype is torch.float32:
                ws = w[0].tolist()
                y = self.grouped(h, [e for e, _ in order], torch.tensor([ws[j] for _, j in order]))
                if y is not None:
                    return y.view(shape)
            out = None
            for e, j in order:
                y = self.experts[e](h) * w[:, j, None]  # (1, D)
                out = y if out is None else out + y  # the same sums, in the same order, as index_add_ below
            return out.view(shape)
        out = torch.zeros_like(h)
        for e in idx.unique().tolist():  # ascending, as transformers sums them: the same float order
            rows, slot = (idx == e).nonzero(as_tuple=True)  # tokens that chose expert e, and in which slot
            out.index_add_(0, rows, self.experts[e](h[rows]) * w[rows, slot, None])
        return out.view(shape)
