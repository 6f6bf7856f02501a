"""lmforge: build language-understanding systems on pretrained Transformers."""

from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["Classifier", "Generator", "LmforgeError", "__version__", "embed_texts", "export", "load",
           "load_full"]

# Lazy: `import lmforge` stays light; torch (and only the layer a name lives in) loads on first use.
_LAZY = {"load": "lmforge.checkpoints", "load_full": "lmforge.checkpoints", "embed_texts": "lmforge.model.heads",
         "Generator": "lmforge.generator", "Classifier": "lmforge.tasks.classifier", "export": "lmforge.tasks.export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
