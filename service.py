"""The mlserve BentoML service: wiring only. Model logic lives in runners/ and mlserve/.

Serve it with ``bentoml serve service:MLServe`` (or ``mlserve serve``). The HTTP routes are a
FastAPI app (mlserve.http) mounted into this service, so BentoML's own /livez and /readyz keep
working beside them, and adaptive batching runs in-process (mlserve.batching). /metrics is
mlserve's own (BentoML's per-path HTTP metrics are off: see below).
"""

from __future__ import annotations

import bentoml

from mlserve.drain import install as install_drain
from mlserve.http import DirectRouteMiddleware, create_app
from mlserve.middleware import (
    API_CSP,
    HeaderLimitMiddleware,
    JsonNotFoundMiddleware,
    SecurityHeadersMiddleware,
)
from mlserve.protocol import install as install_header_timeout
from mlserve.settings import get_settings

_settings = get_settings()
# Imported by each worker before BentoML builds its uvicorn config: bound slow request headers.
# With httptools, also a cap on the bytes of incomplete headers: HeaderLimitMiddleware's limit
# plus 64 KB (it answers 431 itself for blocks a little over; this bounds what is read at all).
install_header_timeout(
    _settings.header_timeout_seconds, max_header_bytes=(_settings.max_header_kb + 64) * 1024
)
# ... and drain on SIGTERM: finish what was sent, take nothing new (mlserve.drain).
install_drain(_settings.drain_seconds)
_http: dict = {}
if _settings.cors_origins:
    _http["cors"] = {
        "enabled": True,
        "access_control_allow_origins": _settings.cors_origins,
        "access_control_allow_methods": ["GET", "POST"],
        "access_control_allow_headers": [
            "Content-Type",
            "Authorization",
            "X-API-Key",
            "X-Request-ID",
        ],
        "access_control_expose_headers": ["X-Request-ID"],
    }
# HTTPS through BentoML's own SSL options (uvicorn's): MLSERVE_SSL_CERTFILE and _KEYFILE.
_ssl = (
    {"ssl": {"enabled": True, "certfile": _settings.ssl_certfile, "keyfile": _settings.ssl_keyfile}}
    if _settings.tls
    else {}
)
# BentoML wraps every request in an OpenTelemetry span (two, with the response's), exported
# nowhere unless a tracing exporter is configured. Unless tracing is wanted, every URL is
# excluded, so the middleware passes requests straight through (mlserve.http logs and counts
# each request itself).
_tracing = {} if _settings.tracing_enabled else {"tracing": {"excluded_urls": ["."]}}
_core = None
http_app = create_app(lambda: _core, docs=_settings.docs_enabled)


@bentoml.service(
    name="mlserve",
    workers=_settings.effective_workers,
    # Above every mlserve deadline, the admin API's wait for all workers included (a 504 here
    # would cancel an admin change half done): see Settings.request_timeout_seconds.
    traffic={"timeout": _settings.request_timeout_seconds},
    http=_http,
    # mlserve.http writes one JSON access line per request; BentoML's own would duplicate it.
    logging={"access": {"enabled": False}},
    # BentoML's HTTP metrics label each series with the raw request path, so any client could
    # add series without bound (and prometheus-client never frees one). mlserve serves /metrics
    # itself, with route templates and loaded versions as the only label values.
    metrics={"enabled": False},
    **_ssl,
    **_tracing,
)
@bentoml.asgi_app(http_app, path="/")
class MLServe:
    """Text classification with several model versions, batched adaptively per worker."""

    def __init__(self) -> None:
        global _core
        from mlserve.core import ClassificationService

        _core = self.core = ClassificationService(get_settings())
        self.core.start()  # models load in the background; /health answers meanwhile

    @bentoml.on_startup
    async def follow_model_control(self) -> None:
        # Runs in the worker's event loop: run-time load/unload/default changes from any
        # worker (see mlserve.control) are applied here too.
        await self.core.start_control()

    def __is_ready__(self) -> bool:
        return self.core.ready

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.core.aclose()


def _docs_csp() -> str:
    if not _settings.docs_enabled:
        return API_CSP
    from mlserve.docs import docs_page

    return docs_page("/openapi.json", http_app.title)[1]


# Outermost (BentoML applies these in order, first = outer), so every response gets the headers:
# BentoML's own routes, CORS preflights and the JSON 404 below.
MLServe.add_asgi_middleware(SecurityHeadersMiddleware, hsts=_settings.tls, docs_csp=_docs_csp())
MLServe.add_asgi_middleware(HeaderLimitMiddleware, max_bytes=_settings.max_header_kb * 1024)
MLServe.add_asgi_middleware(JsonNotFoundMiddleware)
# Innermost: mlserve's plain routes straight to their handlers, past the routing layers of
# BentoML's app and FastAPI's (mlserve.http.DirectRouteMiddleware). Not with CORS, whose
# middleware BentoML puts below these.
if not _settings.cors_origins:
    MLServe.add_asgi_middleware(DirectRouteMiddleware, fastapi_app=http_app)
