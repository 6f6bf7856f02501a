"""The adapter admin endpoints: list, load and unload LoRA adapters over the served base at run time.

  GET    /v1/adapters                 the loaded adapters (name, kind, rank, rows running, state)
  POST   /v1/adapters {name, path}    read a LoRA run dir / PEFT dir on the server's disk and serve it as `name`
  DELETE /v1/adapters/{name}          stop admitting rows for it; its running rows finish, then its slot is freed

They are behind the API key like every /v1 route. A server bound to a non-loopback address without an API key
refuses them (403): loading reads paths on the server's disk.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import Field

from lmforge.serve.adapters import AdapterError
from lmforge.serve.errors import ApiError
from lmforge.serve.routes_common import adapter_api_error, read_body, state
from lmforge.serve.schemas import RequestBody
from lmforge.serve.settings import is_loopback

router = APIRouter()


class AdapterLoadRequest(RequestBody):
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)


def _admin(request: Request):
    st = state(request)
    if not st.settings.api_key and not is_loopback(st.settings.host):
        raise ApiError(403, f"adapter administration needs an API key on a server bound to {st.settings.host} "
                            "(start it with --api-key)", None, "admin_needs_api_key")
    return st


def _row(st, a) -> dict:
    return {"id": a.name, "object": "adapter", "parent": st.model_id, "created": a.created, **a.describe()}


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    st = state(request)
    return {"object": "list", "data": [_row(st, a) for a in st.adapters.all()]}


@router.post("/v1/adapters")
async def load_adapter(request: Request):
    st = _admin(request)
    body: AdapterLoadRequest = await read_body(request, AdapterLoadRequest)
    try:
        a = await asyncio.to_thread(st.load_adapter, body.name, body.path)
    except AdapterError as e:
        raise adapter_api_error(e) from None
    return _row(st, a)


@router.delete("/v1/adapters/{name}")
async def unload_adapter(request: Request, name: str):
    st = _admin(request)
    try:
        a = st.adapters.unload(name)
    except AdapterError as e:
        raise adapter_api_error(e) from None
    return {"id": a.name, "object": "adapter", "deleted": True, "running": a.active,
            "state": "draining" if a.active > 0 else "unloaded"}
