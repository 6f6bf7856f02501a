"""lmforge: build language-understanding systems on pretrained Transformers."""

from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["Classifier", "Generator", "LmforgeError", "__version__", "embed_texts", "load", "load_full"]


def __getattr__(name: str):
    # Lazy: `import lmforge` stays light; torch loads when the API is first used.
    if name in ("load", "load_full", "embed_texts", "Generator", "Classifier"):
        from lmforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
