"""mlserve.http.DirectRouteMiddleware: plain routes go straight to their handler, with the same
answer as through FastAPI; everything else goes the whole way."""

from __future__ import annotations

import asyncio
import json

from benchmarks.budget import call as asgi_call
from mlserve.http import DirectRouteMiddleware, create_app


def call(app, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request through ``app``: its status, headers and body."""
    sent = asyncio.run(asgi_call(app, path, body, method))
    start = sent[0]
    body_out = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body_out


def middleware():
    fastapi_app = create_app(lambda: None, docs=False)
    passed: list[str] = []

    async def rest_of_the_stack(scope, receive, send):
        passed.append(scope["path"])
        await fastapi_app(scope, receive, send)

    return DirectRouteMiddleware(rest_of_the_stack, fastapi_app=fastapi_app), passed


def test_plain_routes_are_answered_directly_like_through_fastapi():
    direct, passed = middleware()
    assert ("POST", "/predict") in direct.routes
    assert ("POST", "/batch-predict") in direct.routes
    assert ("GET", "/health") in direct.routes
    status, headers, body = call(direct, "GET", "/health")
    assert passed == []  # answered without the rest of the stack
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert b"x-request-id" in headers
    via_fastapi = call(direct.fastapi_app, "GET", "/health")
    assert via_fastapi[0] == status and via_fastapi[2] == body


def test_routes_with_path_or_upload_inputs_and_other_methods_go_the_whole_way():
    direct, passed = middleware()
    assert not any(path.startswith("/models/{") for _, path in direct.routes)
    assert ("POST", "/batch-predict/file") not in direct.routes  # a multipart upload
    call(direct, "POST", "/health")  # wrong method: FastAPI answers 405
    call(direct, "GET", "/health/")  # not the exact path
    call(direct, "GET", "/nowhere")
    assert passed == ["/health", "/health/", "/nowhere"]
