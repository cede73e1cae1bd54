"""mlserve.http.DirectRouteMiddleware: plain routes go straight to their handler, with the same
answer as through FastAPI; everything else goes the whole way."""

from __future__ import annotations

import asyncio
import json

from mlserve.http import DirectRouteMiddleware, create_app


def call(app, method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    headers = [(b"host", b"test")]
    if body:
        headers += [(b"content-type", b"application/json")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
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
