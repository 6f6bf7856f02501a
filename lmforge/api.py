"""The Python front door: what the README shows. Re-exports only; each name lives in the layer that owns it."""

from __future__ import annotations

from lmforge.checkpoints import Loaded, load, load_full
from lmforge.generator import Generator
from lmforge.model.heads import embed_texts
from lmforge.tasks.classifier import Classifier
from lmforge.tasks.export import export
from lmforge.tasks.grounding import unsupported_content
from lmforge.tasks.textgen import TaskOutput, answer, summarize, translate

__all__ = ["Classifier", "Generator", "Loaded", "TaskOutput", "answer", "embed_texts", "export", "load", "load_full",
           "summarize", "translate", "unsupported_content"]
