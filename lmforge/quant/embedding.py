"""QuantEmbedding: a token embedding held as int8 rows (a model's quantized input table)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant.numerics import quantize_int8


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows (one scale per token): a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, dim, dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        w = emb.weight
        m = cls(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        q, s = quantize_int8(w)
        with torch.no_grad():
            m.qweight.copy_(q)
            m.scales.copy_(s)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids (...) -> (..., D)
        return F.embedding(ids, self.qweight).to(self.dtype) * F.embedding(ids, self.scales).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.to(self.dtype) * self.scales.to(self.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

