"""The HTTP API (a Starlette app that ``service.py`` mounts into the BentoML service).

Every error is turned into a JSON body here, in one place: typed :mod:`mlserve.errors` map to
their status codes, schema errors to 422, anything unexpected to a bare 500. No stack trace,
path or input text ever reaches a response or the request log.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import pydantic
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlserve import observability as obs
from mlserve.admin import require_admin, require_api_key
from mlserve.core import ClassificationService, Outcome
from mlserve.errors import (
    BadRequestError,
    MLServeError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    ValidationError,
    error_body,
)
from mlserve.schemas import (
    BatchPredictRequest,
    LoadModelRequest,
    PredictRequest,
    SetDefaultRequest,
    UnloadModelRequest,
)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[Request, ClassificationService, str], Awaitable[Response]]


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _require_type(request: Request, expected: str) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != expected:
        raise UnsupportedMediaTypeError(
            f"Content-Type must be {expected}, got {media or 'none'}", expected=expected
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is over the {limit} byte limit", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is over the {limit} byte limit", limit=limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what we already read
    return body


async def _json_body(request: Request, limit: int) -> object:
    _require_type(request, "application/json")
    body = await _read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, absurd nesting
        raise BadRequestError("request body is not valid JSON") from None


def _schema_error(exc: pydantic.ValidationError) -> ValidationError:
    problems = [
        {"field": ".".join(str(p) for p in e["loc"]) or "body", "problem": e["msg"]}
        for e in exc.errors(include_input=False, include_url=False)
    ]
    return ValidationError("the request body does not match the schema", problems=problems)


def _parse(model: type[pydantic.BaseModel], data: object) -> pydantic.BaseModel:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _schema_error(exc) from None


def _log_io(core: ClassificationService, rid: str, texts: list[str], outcome: Outcome) -> None:
    if core.settings.log_io:
        obs.json_logger("mlserve.io").info(
            "io",
            extra={
                "fields": {
                    "request_id": rid,
                    "texts": texts,
                    "labels": [p["label"] for p in outcome.predictions()],
                }
            },
        )


def _batch_body(outcome: Outcome, rid: str) -> dict:
    return {
        "predictions": outcome.predictions(),
        "total_latency_ms": round(outcome.total_ms, 3),
        "model_version": outcome.model.tag,
        "decision_rule": outcome.model.runner.calibrator.decision_rule,
        "request_id": rid,
        "timing": outcome.timing(),
    }


async def _classify(
    request: Request, core: ClassificationService, rid: str, texts: list[str], version: str | None
) -> Outcome:
    """Run one request's texts, log inputs/outputs when enabled, and tag the access log."""
    outcome = await core.classify(texts, version)
    _log_io(core, rid, texts, outcome)
    request.state.model_version = outcome.model.tag
    return outcome


async def predict(request: Request, core: ClassificationService, rid: str) -> Response:
    body = _parse(PredictRequest, await _json_body(request, core.settings.max_body_bytes))
    outcome = await _classify(request, core, rid, [body.text], body.model_version)
    return JSONResponse(
        {
            **outcome.predictions()[0],
            "latency_ms": round(outcome.total_ms, 3),
            "model_version": outcome.model.tag,
            "decision_rule": outcome.model.runner.calibrator.decision_rule,
            "request_id": rid,
            "timing": outcome.timing(),
        }
    )


async def batch_predict(request: Request, core: ClassificationService, rid: str) -> Response:
    body = _parse(BatchPredictRequest, await _json_body(request, core.settings.max_body_bytes))
    outcome = await _classify(request, core, rid, body.texts, body.model_version)
    return JSONResponse(_batch_body(outcome, rid))


def _texts_from_upload(name: str, raw: bytes) -> list[str]:
    """Texts from a CSV (``text`` column) or JSONL (objects with ``text``) upload."""
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"upload is not UTF-8 text (byte {exc.start} is invalid)") from exc
    if not content.strip():
        raise ValidationError("the uploaded file is empty")
    if name.lower().endswith(".csv"):
        try:
            rows = list(csv.DictReader(io.StringIO(content, newline=""), strict=True))
        except csv.Error as exc:
            raise BadRequestError(f"upload is not valid CSV ({exc})") from exc
        if not rows or "text" not in rows[0]:
            raise ValidationError("the CSV upload needs a 'text' column")
        texts = [r["text"] for r in rows]
    elif name.lower().endswith((".jsonl", ".ndjson")):
        texts = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                raise BadRequestError(f"line {lineno} of the upload is not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValidationError(f"line {lineno} needs a string 'text' field")
            texts.append(obj["text"])
    else:
        raise UnsupportedMediaTypeError("upload a .csv (with a 'text' column) or a .jsonl file")
    if any(t is None for t in texts):
        raise BadRequestError("a CSV row has fewer fields than the header")
    return texts


async def batch_predict_file(request: Request, core: ClassificationService, rid: str) -> Response:
    _require_type(request, "multipart/form-data")
    await _read_body(request, core.settings.max_upload_bytes)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:
        raise BadRequestError("the multipart body could not be parsed") from exc
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ValidationError("send the file in a multipart field named 'file'")
    texts = _texts_from_upload(upload.filename or "", await upload.read())
    version = form.get("model_version") or request.query_params.get("model_version")
    version = version if isinstance(version, str) else None
    outcome = await _classify(request, core, rid, texts, version)
    return JSONResponse(_batch_body(outcome, rid))


async def health(request: Request, core: ClassificationService, rid: str) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request, core: ClassificationService, rid: str) -> Response:
    state = core.readiness()
    return JSONResponse(state, status_code=200 if state["ready"] else 503)


async def version(request: Request, core: ClassificationService, rid: str) -> Response:
    return JSONResponse(core.version_info())


async def models(request: Request, core: ClassificationService, rid: str) -> Response:
    return JSONResponse(
        {
            "models": [m.summary() for m in core.registry.list()],
            "defaults": core.registry.defaults(),
            "service_default": core.settings.default_model,
        }
    )


async def model_detail(request: Request, core: ClassificationService, rid: str) -> Response:
    name, ver = request.path_params["name"], request.path_params["version"]
    model = core.registry.resolve(f"{name}:{ver}")
    return JSONResponse({**model.summary(), "metadata": public_metadata(model.metadata)})


def public_metadata(metadata: dict) -> dict:
    """A model's metadata as the API shows it: a training file's path on the training machine
    is cut to its file name."""
    dataset = metadata.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("source"), str):
        return metadata
    source = dataset["source"]
    name = PurePath(source.replace("\\", "/")).name
    return {**metadata, "dataset": {**dataset, "source": name or source}}


async def metrics(request: Request, core: ClassificationService, rid: str) -> Response:
    body, content_type = await asyncio.to_thread(obs.render_metrics)
    return Response(body, media_type=content_type)


Auth = Literal["none", "api_key", "admin"]


@dataclass(frozen=True)
class RouteSpec:
    """One route of the API: its path template, handler, methods and who may call it."""

    path: str
    handler: Handler
    methods: tuple[str, ...]
    auth: Auth = "none"


def _authorize(spec: RouteSpec, request: Request, core: ClassificationService) -> None:
    """The route's access rule, in one place. An admin route's denial is counted and
    summarised in the audit log (never one line per denied call)."""
    if spec.auth == "api_key":
        require_api_key(request.headers, core.settings)
    elif spec.auth == "admin":
        try:
            request.state.actor = require_admin(request.headers.get("authorization"), core.settings)
        except MLServeError as exc:
            client = request.client.host if request.client else None
            core.audit.denied(spec.path, exc.code, client)
            raise


def _endpoint(spec: RouteSpec, get_core: Callable[[], ClassificationService]):
    access = obs.json_logger("mlserve.access")
    route, handler = spec.path, spec.handler

    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        rid = _request_id(request)
        core = get_core()
        try:
            _authorize(spec, request, core)
            response = await handler(request, core, rid)
        except MLServeError as exc:
            obs.observe_error(exc.code)
            response = JSONResponse(exc.to_dict(rid), status_code=exc.status)
        except Exception:
            obs.observe_error("internal_error")
            access.exception("unhandled error", extra={"fields": {"request_id": rid}})
            response = JSONResponse(
                error_body("internal_error", "unexpected server error", rid), status_code=500
            )
        elapsed = time.perf_counter() - start
        response.headers["x-request-id"] = rid
        if core is not None and core.balancer.seen(request.client):
            response.headers["connection"] = "close"  # the client reconnects (mlserve.balance)
        obs.observe_request(route, response.status_code, elapsed)
        if route not in ("/health", "/ready", "/metrics"):
            access.info(
                "request",
                extra={
                    "fields": {
                        "request_id": rid,
                        "route": route,
                        "status": response.status_code,
                        "latency_ms": round(elapsed * 1000, 3),
                        "model_version": getattr(request.state, "model_version", None),
                    }
                },
            )
        return response

    return endpoint


async def model_drift(request: Request, core: ClassificationService, rid: str) -> Response:
    name, ver = request.path_params["name"], request.path_params["version"]
    core.registry.resolve(f"{name}:{ver}")  # 422 for unsafe names, 404 for unknown ones
    # Computed off the event loop (or reused, if no input arrived since the last report).
    return JSONResponse(await asyncio.to_thread(core.drift_report, name, ver))


async def admin_stats(request: Request, core: ClassificationService, rid: str) -> Response:
    return JSONResponse(await asyncio.to_thread(core.stats))


def _audit(
    request: Request,
    core: ClassificationService,
    rid: str,
    action: str,
    target: dict,
    error: MLServeError | None,
    result: dict | None = None,
) -> None:
    """Write one authenticated change (or its failure) to the audit log, durably."""
    entry = {
        "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "actor": getattr(request.state, "actor", None),
        "action": action,
        "target": target,
        "request_id": rid,
        "client": request.client.host if request.client else None,
        "worker": core.control.worker_id,
    }
    if result is not None:
        entry.update(
            result="ok" if result["complete"] else "partial",
            status=200 if result["complete"] else 202,
            generation=result["generation"],
            lagging=result["lagging"],
        )
    elif error is not None:
        entry.update(result="error", status=error.status, error=error.code, message=error.message)
    try:
        core.audit.record(entry)
    except OSError:
        obs.json_logger("mlserve.access").error(
            "audit log write failed", extra={"fields": {"request_id": rid}}
        )


def _admin_change(action: str, schema: type[pydantic.BaseModel], run: Callable) -> Handler:
    """An authenticated, audited change to the loaded models (``run(core, body)``)."""

    async def handler(request: Request, core: ClassificationService, rid: str) -> Response:
        target: dict = {}
        try:
            raw = await _json_body(request, core.settings.max_body_bytes)
            if isinstance(raw, dict):
                # What was asked for, as sent (bounded: the log must not grow by request size).
                target = {
                    str(k)[:64]: v[:200] if isinstance(v, str) else v
                    for k, v in list(raw.items())[:8]
                    if isinstance(v, str | bool)
                }
            body = _parse(schema, raw)
            core.audit.log.check()  # no change that could not be recorded
            result = await run(core, body)
        except MLServeError as exc:
            _audit(request, core, rid, action, target, exc)
            raise
        _audit(request, core, rid, action, target, None, result)
        return JSONResponse(result, status_code=200 if result["complete"] else 202)

    return handler


admin_load = _admin_change(
    "load", LoadModelRequest, lambda core, b: core.control.load(b.tag, b.make_default)
)
admin_default = _admin_change(
    "default", SetDefaultRequest, lambda core, b: core.control.set_default(b.name, b.version)
)
admin_unload = _admin_change(
    "unload", UnloadModelRequest, lambda core, b: core.control.unload(b.tag)
)


async def admin_models(request: Request, core: ClassificationService, rid: str) -> Response:
    return JSONResponse(await asyncio.to_thread(core.control.status))


async def admin_config(request: Request, core: ClassificationService, rid: str) -> Response:
    """The server's effective configuration: each value's source, secrets masked."""
    from mlserve.config import effective_config

    return JSONResponse(effective_config(core.settings))


ROUTES: list[RouteSpec] = [
    RouteSpec("/predict", predict, ("POST",), "api_key"),
    RouteSpec("/batch-predict", batch_predict, ("POST",), "api_key"),
    RouteSpec("/batch-predict/file", batch_predict_file, ("POST",), "api_key"),
    RouteSpec("/health", health, ("GET",)),
    RouteSpec("/ready", ready, ("GET",)),
    RouteSpec("/metrics", metrics, ("GET",)),
    RouteSpec("/version", version, ("GET",)),
    RouteSpec("/models", models, ("GET",)),
    RouteSpec("/models/{name}/{version}", model_detail, ("GET",)),
    RouteSpec("/models/{name}/{version}/drift", model_drift, ("GET",), "api_key"),
    RouteSpec("/admin/stats", admin_stats, ("GET",), "admin"),
    RouteSpec("/admin/models", admin_models, ("GET",), "admin"),
    RouteSpec("/admin/models/load", admin_load, ("POST",), "admin"),
    RouteSpec("/admin/models/default", admin_default, ("POST",), "admin"),
    RouteSpec("/admin/models/unload", admin_unload, ("POST",), "admin"),
    RouteSpec("/admin/config", admin_config, ("GET",), "admin"),
]


class JsonNotFoundMiddleware:
    """Turn the plain-text 404 of BentoML's outer router (unknown paths) into a JSON error."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def guarded_send(message: dict) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced = True
                    body = json.dumps(error_body("not_found", "no route for this path")).encode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 404,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced:  # swallow the original plain-text body
                return
            await send(message)

        await self.app(scope, receive, guarded_send)


def create_app(get_core: Callable[[], ClassificationService]) -> Starlette:
    """The mlserve routes; ``get_core`` returns this worker's service core."""
    routes = [
        Route(spec.path, _endpoint(spec, get_core), methods=list(spec.methods)) for spec in ROUTES
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 404:
            return JSONResponse(error_body("not_found", "no route for this path"), 404)
        return JSONResponse(
            error_body("method_not_allowed", f"{request.method} is not allowed on this route"),
            status,
        )

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
