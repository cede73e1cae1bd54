"""The mlserve BentoML service: wiring only. Model logic lives in runners/ and mlserve/.

Serve it with ``bentoml serve service:MLServe`` (or ``mlserve serve``). The HTTP routes are a
Starlette app (mlserve.http) mounted into this service, so BentoML's own /livez and /readyz keep
working beside them, and adaptive batching runs in-process (mlserve.batching). /metrics is
mlserve's own (BentoML's per-path HTTP metrics are off: see below).
"""

from __future__ import annotations

import bentoml

from mlserve.http import JsonNotFoundMiddleware, create_app
from mlserve.settings import get_settings

_settings = get_settings()
_cors = (
    {
        "cors": {
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
    }
    if _settings.cors_origins
    else {}
)
_core = None
http_app = create_app(lambda: _core)


@bentoml.service(
    name="mlserve",
    workers=_settings.effective_workers,
    traffic={"timeout": _settings.infer_timeout_seconds + 5},
    http=_cors,
    # mlserve.http writes one JSON access line per request; BentoML's own would duplicate it.
    logging={"access": {"enabled": False}},
    # BentoML's HTTP metrics label each series with the raw request path, so any client could
    # add series without bound (and prometheus-client never frees one). mlserve serves /metrics
    # itself, with route templates and loaded versions as the only label values.
    metrics={"enabled": False},
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


MLServe.add_asgi_middleware(JsonNotFoundMiddleware)
