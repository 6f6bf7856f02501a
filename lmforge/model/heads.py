"""Task heads on top of the backbone: pooling, sequence classification, extractive-QA spans, embeddings.

The LM head lives in Transformer.lm_logits (it may be tied to the token embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer

POOLINGS = ("last", "cls", "mean")


def pool(h: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, D) -> (B, D).

    "last" takes the last real token found from the attention mask, not from token ids, so it is right
    under left or right padding and when the pad id equals the eos id (the GPT-2 classification pitfall).
    """
    B, T, _ = h.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=h.device)
    m = attention_mask[:, -T:].to(h.device)
    if how == "last":
        idx = (m.long() * torch.arange(1, T + 1, device=h.device)).argmax(-1)  # (B,) last position with mask 1
        return h[torch.arange(B, device=h.device), idx]
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        w = m.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    raise ConfigError(f"pooling {how!r} is not one of {POOLINGS}")


def default_pooling(cfg: ModelConfig) -> str:
    return "last" if cfg.causal else "cls"


class SequenceClassifier(nn.Module):
    """Backbone + pooling + linear classifier. Names follow HF: `score` for decoders, `classifier` for bert."""

    def __init__(self, backbone: Transformer, num_labels: int, pooling: str | None = None) -> None:
        super().__init__()
        cfg = backbone.cfg
        self.backbone = backbone
        self.pooling = pooling or default_pooling(cfg)
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        self.drop = nn.Dropout(cfg.dropout)
        # HF decoders (GPT2/Llama/Gemma3ForSequenceClassification) use a bias-free `score`; bert a `classifier`.
        self.score = nn.Linear(cfg.d_model, num_labels, bias=cfg.family == "bert")
        nn.init.normal_(self.score.weight, std=0.02)
        if self.score.bias is not None:
            nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask, token_type_ids=token_type_ids)  # (B, T, D)
        pooled = pool(h, attention_mask, self.pooling)  # (B, D)
        if self.pooling == "cls" and self.backbone.pooler is not None:
            pooled = torch.tanh(self.backbone.pooler(pooled))  # bert's pooler, as HF's classifier uses
        return self.score(self.drop(pooled))  # (B, num_labels)


class SpanHead(nn.Module):
    """Start/end logits for extractive QA (HF name: qa_outputs)."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.qa_outputs = nn.Linear(backbone.cfg.d_model, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(input_ids, attention_mask, token_type_ids=token_type_ids)  # (B, T, D)
        start, end = self.qa_outputs(h).unbind(-1)  # (B, T) each
        return start, end


@torch.no_grad()
def embed(backbone: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
          token_type_ids: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """Mean-pooled sentence embeddings (B, D), as sentence-transformers computes them."""
    h = backbone(input_ids, attention_mask, token_type_ids=token_type_ids)
    e = pool(h, attention_mask, "mean")
    return F.normalize(e, dim=-1) if normalize else e
