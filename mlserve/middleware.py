"""ASGI middleware that ``service.py`` puts around the whole BentoML app, so it also covers
BentoML's own routes (/livez, /readyz), CORS preflights and unknown paths.

* :class:`SecurityHeadersMiddleware` adds the security headers to every response, and
  ``Connection: close`` to every response while the worker drains (mlserve.drain).
* :class:`HeaderLimitMiddleware` refuses (431) a request whose headers are too large.
* :class:`JsonNotFoundMiddleware` turns the plain-text 404 of BentoML's outer router into the
  service's JSON error body.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mlserve import drain
from mlserve.errors import error_body

_CLOSE = (b"connection", b"close")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
# Paths of the interactive docs, whose page needs its own script and styles (see mlserve.docs).
DOCS_PREFIXES = ("/docs",)
# Static documentation assets may be cached; everything else is an API answer.
ASSET_PREFIX = "/docs/assets/"


async def send_error(
    send: Callable, status: int, code: str, message: str, *, close: bool = False
) -> None:
    """Send the service's JSON error body as a whole ASGI response."""
    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SecurityHeadersMiddleware:
    """``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy`` and a
    ``Content-Security-Policy`` on every response (``default-src 'none'`` on the API, the docs
    page's own policy there), ``Cache-Control: no-store`` on every API answer, and
    ``Strict-Transport-Security`` when the server speaks TLS."""

    def __init__(self, app: Callable, *, hsts: bool = False, docs_csp: str = API_CSP) -> None:
        self.app = app
        common = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if hsts:
            common.append((b"strict-transport-security", b"max-age=31536000; includeSubDomains"))
        self._api = [*common, (b"content-security-policy", API_CSP.encode())]
        self._docs = [*common, (b"content-security-policy", docs_csp.encode())]
        self._no_store = (b"cache-control", b"no-store")
        self._asset_cache = (b"cache-control", b"public, max-age=86400")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        docs = path.startswith(DOCS_PREFIXES)
        extra = [*(self._docs if docs else self._api)]
        extra.append(self._asset_cache if path.startswith(ASSET_PREFIX) else self._no_store)
        names = {name for name, _ in extra}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                if drain.STATE.draining:  # the client's next request goes elsewhere
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"]
                    headers.append(_CLOSE)
                message = {**message, "headers": [*headers, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeaderLimitMiddleware:
    """Answer 431 (JSON) to a request whose header block is over ``max_bytes``, before any other
    part of the server spends time on it."""

    def __init__(self, app: Callable, *, max_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if size > self.max_bytes:
                message = f"the request headers are over the {self.max_bytes} byte limit"
                await send_error(send, 431, "headers_too_large", message, close=True)
                return
        await self.app(scope, receive, send)


class JsonNotFoundMiddleware:
    """Turn the plain-text 404 of BentoML's outer router (unknown paths) into a JSON error."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced = True
                    await send_error(send, 404, "not_found", "no route for this path")
                    return
            if replaced:  # swallow the original plain-text body
                return
            await send(message)

        await self.app(scope, receive, guarded_send)
