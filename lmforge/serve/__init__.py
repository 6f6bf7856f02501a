"""Serving models over HTTP: an OpenAI-compatible API, task endpoints and a web page (`lmforge serve`).

Needs fastapi and uvicorn (`pip install fastapi uvicorn`); importing this package does not, so
`lmforge.serve.batching` stays usable without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.serve.app import BackgroundServer, create_app
    from lmforge.serve.settings import Embedder, ServeSettings

__all__ = ["BackgroundServer", "Embedder", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("Embedder", "ServeSettings"):  # no fastapi needed for these
        from lmforge.serve import settings

        return getattr(settings, name)
    if name in __all__:
        from lmforge.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
