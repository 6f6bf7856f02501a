"""The gate every request passes: Host check, API key, JSON-only POSTs, body size, CORS, one log line and
its metrics (serve/metrics.py).

Why the Host and Content-Type checks: with no API key, any web page the user visits could otherwise drive a
local server. A form or `text/plain` POST is a "simple" cross-site request that browsers send without asking;
requiring `application/json` forces a CORS preflight, which fails because we send no CORS headers (unless
`cors_origin` names a trusted page). DNS rebinding (evil.example re-resolving to 127.0.0.1) makes the browser
treat the server as same-origin, but the Host header still says evil.example, so we refuse foreign hosts.

Below the ASGI layer, `header_timeout_protocol` closes connections whose request headers do not arrive in time:
an ASGI middleware never sees a request whose headers are incomplete.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from lmforge.serve.errors import ApiError, error_response

if TYPE_CHECKING:
    from lmforge.serve.metrics import Metrics
    from lmforge.serve.settings import ServeSettings

log = logging.getLogger("lmforge.serve")
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
HEADER_TIMEOUT_S = 10.0  # time a client has to send a request's headers (read when a wait starts)


def host_name(host: str) -> str:
    """A Host header value -> its lower-case name without port: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(name: str, allowed: set[str]) -> bool:
    """Exact names, "*" for any, and ".example.com" for that domain and its subdomains (as Django does)."""
    if "*" in allowed or name in allowed:
        return True
    return any(a.startswith(".") and (name == a[1:] or name.endswith(a)) for a in allowed)


class Gate:
    """Pure ASGI (streams and disconnects pass through untouched), so it sees every request before routing."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics | None = None) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.allowed = {host_name(h) for h in (*LOCAL_NAMES, settings.host, *settings.allowed_hosts)}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: dict[str, Any] = {"status": None, "tokens_in": 0, "tokens_out": 0}
        scope.setdefault("state", {})["lmforge_log"] = info
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        cors = self._cors_headers(headers)

        async def send_logged(msg) -> None:
            if msg["type"] == "http.response.start":
                info["status"] = msg["status"]
                if cors:
                    msg = {**msg, "headers": [*msg.get("headers", []), *cors]}
            await send(msg)

        try:
            err = self._check(scope, headers)
            if err is not None:
                await error_response(err)(scope, receive, send_logged)
            elif cors and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                await self._preflight(send_logged)
            else:
                await self.app(scope, receive, send_logged)
        except Exception:
            info["status"] = info["status"] or 500
            raise
        finally:
            ms = (time.perf_counter() - t0) * 1000
            if self.metrics is not None:
                self.metrics.request(scope["path"], info["status"], ms / 1000, info["tokens_in"], info["tokens_out"])
            extra = " (client disconnected)" if info.get("disconnected") else ""
            log.info("%s %s %s in=%d out=%d %.1fms%s", scope["method"], scope["path"], info["status"] or "-",
                     info["tokens_in"], info["tokens_out"], ms, extra)

    def _check(self, scope, headers: dict[bytes, bytes]) -> ApiError | None:
        host = headers.get(b"host")
        if host is not None:
            name = host_name(host.decode("latin-1"))
            server = scope.get("server")
            if not host_allowed(name, self.allowed) and not (server and name == str(server[0]).lower()):
                return ApiError(403, f"Host '{name}' is not allowed here (DNS rebinding protection); start the "
                                     f"server with --allowed-hosts {name} to serve it", None, "host_not_allowed")
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if self.settings.api_key and scope["path"].startswith("/v1/") and not preflight:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode("latin-1"), self.settings.api_key.encode()):
                why = "no API key given (send 'Authorization: Bearer KEY')" if not given else "incorrect API key"
                return ApiError(401, why, None, "invalid_api_key")
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                shown = f"'{ctype}'" if ctype else "none"
                return ApiError(415, f"Content-Type must be application/json (got {shown})", None,
                                "unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "invalid Content-Length header", None, "invalid_request")
            if int(length) > self.settings.max_body_bytes:
                return ApiError(413, f"request body of {int(length)} bytes is larger than this server's limit of "
                                     f"{self.settings.max_body_bytes} bytes", None, "request_too_large")
        return None

    def _cors_headers(self, headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """CORS headers only when cors_origin is set and the request comes from that origin (or it is "*")."""
        origin = headers.get(b"origin")
        want = self.settings.cors_origin
        if not want or origin is None or (want != "*" and origin.decode("latin-1").rstrip("/") != want):
            return []
        return [(b"access-control-allow-origin", want.encode()), (b"vary", b"Origin")]

    async def _preflight(self, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"Authorization, Content-Type"),
            (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})


def header_timeout_protocol(seconds: float | None = None) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) that closes a connection whose request
    headers are not complete `seconds` (default HEADER_TIMEOUT_S) after it opened or after the first byte of a
    keep-alive connection's next request. Neither uvicorn nor h11 has such a timeout: a client that sends half a
    header (slowloris) would otherwise hold a connection and a file descriptor forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _header_timer = None
        _armed_cycle = None  # the request cycle current when the wait began: a new one means headers arrived

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of the next request on a keep-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._armed_cycle:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._armed_cycle = self.cycle
            wait = HEADER_TIMEOUT_S if seconds is None else seconds
            self._header_timer = self.loop.call_later(wait, self._headers_too_slow, wait)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self, wait: float) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request headers within %g s", self.client, wait)
                self.transport.close()

    return HeaderTimeoutProtocol
