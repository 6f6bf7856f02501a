"""The endpoints outside /v1/ (no API key needed; see docs/serving.md): the chat page at /, /health and
/metrics. The page's scripts and styles are mounted at /static by app.create_app."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from lmforge.serve.routes_common import state

STATIC = Path(__file__).resolve().parent / "static"
router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health")
async def health(request: Request):
    st = state(request)
    cfg = st.settings
    return {"status": "ok", "model": st.model_id, "embedder": st.emb_id if st.embedder is not None else None,
            "classifier": st.cls_id, "uptime_s": round(time.time() - st.started, 1),
            "generation": {"running": st.sched.running, "waiting": st.sched.waiting,
                           "max_concurrent": cfg.max_concurrent, "max_queue": cfg.max_queue, **st.sched.stats,
                           "decode_step": st.sched.decode_step},  # what batch-1 steps ran last, and why
            "limits": {"max_tokens": cfg.max_tokens, "max_prompt_tokens": st.max_prompt, "context_length": st.ctx,
                       "max_body_bytes": cfg.max_body_bytes},
            "api_key_required": bool(cfg.api_key)}


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus text format."""
    m = state(request).metrics
    return Response(m.render(), media_type=m.content_type)
