"""A typed Python client for the mlserve HTTP API, synchronous (:class:`Client`) and asynchronous
(:class:`AsyncClient`), over httpx.

Both flavours share one implementation: :class:`_Calls` builds each route's ``httpx.Request``
and parses its ``httpx.Response`` into the route's :mod:`mlserve.schemas` model or a typed
:class:`MLServeClientError`; the two classes only send. ::

    with Client("http://127.0.0.1:3000", api_key=KEY) as client:
        client.predict("Great drug, no side effects").label

    async with AsyncClient("http://127.0.0.1:3000", admin_token=TOKEN) as client:
        await client.promote("sentiment:v2")

The API key goes in ``X-API-Key`` on every call but the admin ones; the admin token goes in
``Authorization: Bearer`` on the ``/admin/*`` calls only. Neither ever appears in an exception's
message or repr, nor in the client's repr.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
import ssl
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pydantic

from mlserve.schemas import (
    AdminChangeResult,
    BatchPredictRequest,
    BatchPredictResponse,
    CompareResponse,
    ConfigResponse,
    ControlStatus,
    DriftReport,
    ErrorBody,
    GpuResponse,
    HealthResponse,
    LoadModelRequest,
    ModelDetail,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    ReadyResponse,
    SetDefaultRequest,
    ShadowRequest,
    StatsResponse,
    TrafficRequest,
    UnloadModelRequest,
    VersionResponse,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "Forbidden",
    "InferenceTimeout",
    "InvalidResponse",
    "MLServeClientError",
    "MLServeConnectionError",
    "MLServeTimeoutError",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "ValidationFailed",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = 30.0
ADMIN_CHANGE_TIMEOUT = 90.0
"""The shortest read timeout of an admin change (load, default, unload, traffic, shadow;
``promote`` too). The server answers a change within ``MLSERVE_CONTROL_TIMEOUT_SECONDS`` (30 s by
default) of its arrival, 202 with the workers that lag, and its own request limit is 60 s: with
the client's 30 s, a change that waits on a slow worker would time out just before its answer."""
_MESSAGE_CHARS = 500  # how much of a non-JSON error body an exception keeps

# --- errors -----------------------------------------------------------------------------------


class MLServeClientError(Exception):
    """Any failed call. ``status`` is the HTTP status (None when no answer came), ``code`` the
    server's ``error`` field (None when the body was not an mlserve error body), ``request_id``
    the request's id from the body or the ``X-Request-ID`` header."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        code = f"{self.code}: " if self.code else ""
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"{where}{code}{self.message}{rid}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )


class MLServeConnectionError(MLServeClientError):
    """No answer: the server could not be reached, or the connection failed mid-call."""


class MLServeTimeoutError(MLServeConnectionError):
    """No answer within the client's timeout."""


class InvalidResponse(MLServeClientError):
    """A success status whose body is not what the route answers (not JSON, wrong schema)."""


class BadRequest(MLServeClientError):
    """400: malformed JSON or a corrupt upload."""


class Unauthorized(MLServeClientError):
    """401: a missing or wrong API key or admin token."""


class Forbidden(MLServeClientError):
    """403: the admin API is disabled (no token configured)."""


class NotFound(MLServeClientError):
    """404: an unknown model or version (``model_not_found``) or route (``not_found``)."""


class Conflict(MLServeClientError):
    """409: a model change the current state refuses."""


class PayloadTooLarge(MLServeClientError):
    """413: a body or upload over the server's limit."""


class UnsupportedMediaType(MLServeClientError):
    """415: a wrong content type or upload file type."""


class ValidationFailed(MLServeClientError):
    """422: the request does not match the schema, or a value is refused."""


class _RetryAfter(MLServeClientError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after  # seconds, from the Retry-After header


class RateLimited(_RetryAfter):
    """429: too many requests; ``retry_after`` in seconds when the server said."""


class ServerError(MLServeClientError):
    """5xx."""


class Unavailable(ServerError, _RetryAfter):
    """503: no model ready, the control store unavailable, GPU out of memory."""


class InferenceTimeout(ServerError):
    """504: inference over MLSERVE_INFER_TIMEOUT_SECONDS."""


_BY_STATUS: dict[int, type[MLServeClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: RateLimited,
    503: Unavailable,
    504: InferenceTimeout,
}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max((when - datetime.datetime.now(datetime.UTC)).total_seconds(), 0.0)


def error_from_response(response: httpx.Response) -> MLServeClientError:
    """The typed error for an error answer; a non-JSON body still gives one (``code`` None)."""
    status = response.status_code
    code, details, request_id = None, None, None
    try:
        body = ErrorBody.model_validate(json.loads(response.content))
    except (ValueError, pydantic.ValidationError):
        text = response.content.decode("utf-8", errors="replace").strip()
        message = text[:_MESSAGE_CHARS] or response.reason_phrase or f"HTTP {status}"
    else:
        code, message, details, request_id = body.error, body.message, body.details, body.request_id
    request_id = request_id or response.headers.get("x-request-id") or None
    if status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif status >= 500:
        cls = ServerError
    else:
        cls = MLServeClientError
    kwargs: dict[str, Any] = dict(status=status, code=code, details=details, request_id=request_id)
    if issubclass(cls, _RetryAfter):
        kwargs["retry_after"] = _retry_after(response.headers.get("retry-after"))
    return cls(message, **kwargs)


def _safe_url(url: str) -> str:
    """``url`` without any user:password part."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _transport_error(exc: httpx.RequestError, url: str) -> MLServeConnectionError:
    """A typed error for a failed exchange, naming the error type and the (credential-free) URL.
    The httpx exception is not chained: its request carries the key and token headers."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return MLServeTimeoutError(f"no answer from {url} in time ({type(exc).__name__})")
    return MLServeConnectionError(f"cannot reach {url}: {detail} ({type(exc).__name__})")


# --- request building and response parsing (shared) -------------------------------------------


@dataclass
class _Call(Generic[T]):
    """One HTTP exchange: the request to send, and how to read its answer."""

    request: httpx.Request
    parse: Callable[[httpx.Response], T]


# A multi-call operation: yields calls, gets each one's result (or its error thrown in).
Flow = Generator[_Call[Any], Any, T]


def split_tag(tag: str, version: str | None = None) -> tuple[str, str]:
    """(name, version) from ``name, version`` or from ``"name:version"``."""
    if version is not None:
        return tag, version
    name, sep, ver = tag.partition(":")
    if not sep or not name or not ver:
        raise ValueError(f"expected name:version, got {tag!r}")
    return name, ver


def _segment(value: str) -> str:
    """One path segment, escaped so that no value can change the route."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _model(model: type[pydantic.BaseModel], ok: tuple[int, ...] = (200,)):
    """A parser: a status in ``ok`` with a body of ``model`` is a result, anything else an
    error."""

    def parse(response: httpx.Response):
        if response.status_code not in ok:
            raise error_from_response(response)
        try:
            return model.model_validate_json(response.content)
        except pydantic.ValidationError as exc:
            raise InvalidResponse(
                f"the answer is not a valid {model.__name__} "
                f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})",
                status=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from None

    return parse


def _ready(response: httpx.Response) -> ReadyResponse:
    """``/ready`` answers 503 with the same body while not ready: that is a result too."""
    if response.status_code == 503:
        try:
            return ReadyResponse.model_validate_json(response.content)
        except pydantic.ValidationError:
            raise error_from_response(response) from None
    return _model(ReadyResponse)(response)


def _text(response: httpx.Response) -> str:
    if response.status_code != 200:
        raise error_from_response(response)
    return response.text


FileInput = str | os.PathLike | bytes | IO[bytes]


def _upload(source: FileInput, filename: str | None) -> tuple[str, bytes]:
    """(file name, content) of an upload: a path, bytes, or a binary file object. The server
    reads the type from the name (``.csv`` or ``.jsonl``); bytes without a name are taken as
    JSONL when they start with ``{``, else as CSV."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return filename or path.name, path.read_bytes()
    if isinstance(source, bytes | bytearray | memoryview):
        content = bytes(source)
    else:
        content = source.read()
        filename = filename or Path(str(getattr(source, "name", "") or "")).name or None
    if filename is None:
        filename = "upload.jsonl" if content.lstrip().startswith(b"{") else "upload.csv"
    return filename, content


class _Calls:
    """Builds every route's request and parser; holds the configuration both clients share."""

    def __init__(
        self,
        base_url: str,
        http: httpx.Client | httpx.AsyncClient,
        api_key: str | None,
        admin_token: str | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._api_key = api_key
        self._admin_token = admin_token

    def build(
        self,
        method: str,
        path: str,
        *,
        admin: bool = False,
        body: pydantic.BaseModel | None = None,
        files: dict | None = None,
        data: dict | None = None,
        min_read_timeout: float | None = None,
    ) -> httpx.Request:
        headers = {"Accept": "application/json"}
        if admin:
            if self._admin_token:
                headers["Authorization"] = f"Bearer {self._admin_token}"
        elif self._api_key:
            headers["X-API-Key"] = self._api_key
        kwargs: dict[str, Any] = {}
        if body is not None:
            # Fields left at their default and not given are not sent (e.g. routing_key).
            kwargs["json"] = body.model_dump(mode="json", exclude_unset=True)
        if files is not None:
            kwargs.update(files=files, data=data)
        timeout = self._http.timeout
        if min_read_timeout is not None and timeout.read is not None:
            read = max(timeout.read, min_read_timeout)
            kwargs["timeout"] = httpx.Timeout(
                connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
            )
        return self._http.build_request(method, self.base_url + path, headers=headers, **kwargs)

    def call(self, method: str, path: str, parse: Callable[[httpx.Response], T], **kw) -> _Call[T]:
        return _Call(self.build(method, path, **kw), parse)

    # --- predictions
    def predict(
        self, text: str, model_version: str | None, routing_key: str | None = None
    ) -> _Call[PredictResponse]:
        key = {"routing_key": routing_key} if routing_key is not None else {}
        body = PredictRequest(text=text, model_version=model_version, **key)
        return self.call("POST", "/predict", _model(PredictResponse), body=body)

    def batch_predict(
        self, texts: list[str], model_version: str | None, routing_key: str | None = None
    ) -> _Call[BatchPredictResponse]:
        key = {"routing_key": routing_key} if routing_key is not None else {}
        body = BatchPredictRequest(texts=list(texts), model_version=model_version, **key)
        return self.call("POST", "/batch-predict", _model(BatchPredictResponse), body=body)

    def predict_file(
        self, source: FileInput, filename: str | None, model_version: str | None
    ) -> _Call[BatchPredictResponse]:
        name, content = _upload(source, filename)
        data = {"model_version": model_version} if model_version else {}
        return self.call(
            "POST",
            "/batch-predict/file",
            _model(BatchPredictResponse),
            files={"file": (name, content)},
            data=data,
        )

    # --- models and probes
    def models(self) -> _Call[ModelsResponse]:
        return self.call("GET", "/models", _model(ModelsResponse))

    def model(self, name: str, version: str | None) -> _Call[ModelDetail]:
        name, version = split_tag(name, version)
        path = f"/models/{_segment(name)}/{_segment(version)}"
        return self.call("GET", path, _model(ModelDetail))

    def drift(self, name: str, version: str | None) -> _Call[DriftReport]:
        name, version = split_tag(name, version)
        path = f"/models/{_segment(name)}/{_segment(version)}/drift"
        return self.call("GET", path, _model(DriftReport))

    def health(self) -> _Call[HealthResponse]:
        return self.call("GET", "/health", _model(HealthResponse))

    def ready(self) -> _Call[ReadyResponse]:
        return self.call("GET", "/ready", _ready)

    def version(self) -> _Call[VersionResponse]:
        return self.call("GET", "/version", _model(VersionResponse))

    def gpu(self) -> _Call[GpuResponse]:
        return self.call("GET", "/gpu", _model(GpuResponse))

    def metrics(self) -> _Call[str]:
        return self.call("GET", "/metrics", _text)

    # --- admin
    def stats(self) -> _Call[StatsResponse]:
        return self.call("GET", "/admin/stats", _model(StatsResponse), admin=True)

    def admin_models(self) -> _Call[ControlStatus]:
        return self.call("GET", "/admin/models", _model(ControlStatus), admin=True)

    def config(self) -> _Call[ConfigResponse]:
        return self.call("GET", "/admin/config", _model(ConfigResponse), admin=True)

    def _change(self, route: str, body: pydantic.BaseModel) -> _Call[AdminChangeResult]:
        # 202: published, but some live worker has not applied it (yet): a result, not an error.
        parse = _model(AdminChangeResult, ok=(200, 202))
        return self.call(
            "POST",
            f"/admin/models/{route}",
            parse,
            admin=True,
            body=body,
            min_read_timeout=ADMIN_CHANGE_TIMEOUT,
        )

    def load(self, tag: str, make_default: bool) -> _Call[AdminChangeResult]:
        return self._change("load", LoadModelRequest(tag=tag, make_default=make_default))

    def set_default(self, name: str, version: str | None) -> _Call[AdminChangeResult]:
        name, version = split_tag(name, version)
        return self._change("default", SetDefaultRequest(name=name, version=version))

    def unload(self, tag: str) -> _Call[AdminChangeResult]:
        return self._change("unload", UnloadModelRequest(tag=tag))

    def traffic(self, name: str, weights: dict[str, int]) -> _Call[AdminChangeResult]:
        return self._change("traffic", TrafficRequest(name=name, weights=dict(weights)))

    def shadow(
        self, name: str, version: str | None, sample: float = 1.0
    ) -> _Call[AdminChangeResult]:
        return self._change("shadow", ShadowRequest(name=name, version=version, sample=sample))

    def compare(self, name: str) -> _Call[CompareResponse]:
        path = f"/admin/models/{_segment(name)}/compare"
        return self.call("GET", path, _model(CompareResponse), admin=True)

    def canary(self, tag: str, weight: int) -> Flow[AdminChangeResult]:
        """Give ``tag`` ``weight`` percent of its name's bare-name requests and the name's
        default version the rest (0 clears the split: a roll back)."""
        name, version = split_tag(tag)
        if not 0 <= weight <= 100:
            raise ValueError(f"weight must be 0 to 100, got {weight}")
        if weight == 0:
            return (yield self.traffic(name, {}))
        status = yield self.admin_models()
        default = ((status.desired or {}).get("defaults") or {}).get(name)
        weights = {version: weight}
        if default is not None and default != version and weight < 100:
            weights[default] = 100 - weight
        return (yield self.traffic(name, weights))

    def promote(self, tag: str) -> Flow[AdminChangeResult]:
        """Make ``tag`` its name's default; when it is not loaded, load it as the default."""
        try:
            return (yield self.set_default(tag, None))
        except NotFound as exc:
            if exc.code != "model_not_found":
                raise
        return (yield self.load(tag, True))


def _single(call: _Call[T]) -> Flow[T]:
    return (yield call)


def _advance(flow: Flow[Any], result: Any, error: MLServeClientError | None) -> tuple[bool, Any]:
    """Step ``flow`` with the last call's result (or error): (True, its value) when it has
    finished, else (False, the next call to send)."""
    try:
        step = flow.throw(error) if error is not None else flow.send(result)
    except StopIteration as stop:
        return True, stop.value
    return False, step


Verify = bool | str | os.PathLike | ssl.SSLContext


def _ssl(verify: Verify) -> bool | ssl.SSLContext:
    """httpx's ``verify``: True, False, an SSL context, or one trusting a CA bundle file (or a
    folder of certificates), e.g. a self-signed server certificate."""
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


def _http_options(timeout: float | httpx.Timeout | None, verify: Verify) -> dict[str, Any]:
    # Idle pooled connections are dropped before uvicorn's 5 s keep-alive closes them.
    limits = httpx.Limits(keepalive_expiry=2.0)
    return {"timeout": timeout, "verify": _ssl(verify), "limits": limits}


class _ClientBase:
    _calls: _Calls
    _owns_http: bool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_safe_url(self._calls.base_url)!r})"

    def _connection_error(self, exc: httpx.RequestError) -> MLServeConnectionError:
        return _transport_error(exc, _safe_url(self._calls.base_url))


# --- the two flavours: only sending differs ---------------------------------------------------


class Client(_ClientBase):
    """Synchronous client. ``transport`` or ``httpx_client`` may be injected (an injected
    client is not closed by :meth:`close`; its base URL and auth are not used)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        verify: Verify = True,
        transport: httpx.BaseTransport | None = None,
        httpx_client: httpx.Client | None = None,
    ) -> None:
        self._owns_http = httpx_client is None
        http = httpx_client or httpx.Client(transport=transport, **_http_options(timeout, verify))
        self._http = http
        self._calls = _Calls(base_url, http, api_key, admin_token)

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.send(call.request)
        except httpx.RequestError as exc:
            raise self._connection_error(exc) from None
        return call.parse(response)

    def _run(self, flow: Flow[T]) -> T:
        done, step = _advance(flow, None, None)
        while not done:
            try:
                result, error = self._send(step), None
            except MLServeClientError as exc:
                result, error = None, exc
            done, step = _advance(flow, result, error)
        return step

    def _one(self, call: _Call[T]) -> T:
        return self._run(_single(call))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def predict(
        self, text: str, model_version: str | None = None, routing_key: str | None = None
    ) -> PredictResponse:
        return self._one(self._calls.predict(text, model_version, routing_key))

    def batch_predict(
        self, texts: list[str], model_version: str | None = None, routing_key: str | None = None
    ) -> BatchPredictResponse:
        return self._one(self._calls.batch_predict(texts, model_version, routing_key))

    def predict_file(
        self, source: FileInput, filename: str | None = None, model_version: str | None = None
    ) -> BatchPredictResponse:
        return self._one(self._calls.predict_file(source, filename, model_version))

    def models(self) -> ModelsResponse:
        return self._one(self._calls.models())

    def model(self, name: str, version: str | None = None) -> ModelDetail:
        return self._one(self._calls.model(name, version))

    def drift(self, name: str, version: str | None = None) -> DriftReport:
        return self._one(self._calls.drift(name, version))

    def health(self) -> HealthResponse:
        return self._one(self._calls.health())

    def ready(self) -> ReadyResponse:
        return self._one(self._calls.ready())

    def version(self) -> VersionResponse:
        return self._one(self._calls.version())

    def gpu(self) -> GpuResponse:
        return self._one(self._calls.gpu())

    def metrics(self) -> str:
        return self._one(self._calls.metrics())

    def stats(self) -> StatsResponse:
        return self._one(self._calls.stats())

    def admin_models(self) -> ControlStatus:
        return self._one(self._calls.admin_models())

    def config(self) -> ConfigResponse:
        return self._one(self._calls.config())

    def load(self, tag: str, make_default: bool = False) -> AdminChangeResult:
        return self._one(self._calls.load(tag, make_default))

    def set_default(self, name: str, version: str | None = None) -> AdminChangeResult:
        return self._one(self._calls.set_default(name, version))

    def promote(self, tag: str) -> AdminChangeResult:
        """Make ``tag`` the default (loading it if needed); ends the name's split and shadow."""
        return self._run(self._calls.promote(tag))

    def traffic(self, name: str, weights: dict[str, int]) -> AdminChangeResult:
        """Split ``name``'s bare-name requests by ``weights`` (percent by version); {} clears."""
        return self._one(self._calls.traffic(name, weights))

    def canary(self, tag: str, weight: int) -> AdminChangeResult:
        """``tag`` gets ``weight`` percent, the name's default the rest; 0 clears the split."""
        return self._run(self._calls.canary(tag, weight))

    def shadow(self, name: str, version: str | None, sample: float = 1.0) -> AdminChangeResult:
        """Run ``sample`` of ``name``'s primary requests on ``version`` too; None clears."""
        return self._one(self._calls.shadow(name, version, sample))

    def compare(self, name: str) -> CompareResponse:
        return self._one(self._calls.compare(name))

    def unload(self, tag: str) -> AdminChangeResult:
        return self._one(self._calls.unload(tag))


class AsyncClient(_ClientBase):
    """Asynchronous client, the same methods as :class:`Client` as coroutines."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        verify: Verify = True,
        transport: httpx.AsyncBaseTransport | None = None,
        httpx_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._owns_http = httpx_client is None
        http = httpx_client or httpx.AsyncClient(
            transport=transport, **_http_options(timeout, verify)
        )
        self._http = http
        self._calls = _Calls(base_url, http, api_key, admin_token)

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.send(call.request)
        except httpx.RequestError as exc:
            raise self._connection_error(exc) from None
        return call.parse(response)

    async def _run(self, flow: Flow[T]) -> T:
        done, step = _advance(flow, None, None)
        while not done:
            try:
                result, error = await self._send(step), None
            except MLServeClientError as exc:
                result, error = None, exc
            done, step = _advance(flow, result, error)
        return step

    def _one(self, call: _Call[T]) -> Awaitable[T]:
        return self._run(_single(call))

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def predict(
        self, text: str, model_version: str | None = None, routing_key: str | None = None
    ) -> PredictResponse:
        return await self._one(self._calls.predict(text, model_version, routing_key))

    async def batch_predict(
        self, texts: list[str], model_version: str | None = None, routing_key: str | None = None
    ) -> BatchPredictResponse:
        return await self._one(self._calls.batch_predict(texts, model_version, routing_key))

    async def predict_file(
        self, source: FileInput, filename: str | None = None, model_version: str | None = None
    ) -> BatchPredictResponse:
        return await self._one(self._calls.predict_file(source, filename, model_version))

    async def models(self) -> ModelsResponse:
        return await self._one(self._calls.models())

    async def model(self, name: str, version: str | None = None) -> ModelDetail:
        return await self._one(self._calls.model(name, version))

    async def drift(self, name: str, version: str | None = None) -> DriftReport:
        return await self._one(self._calls.drift(name, version))

    async def health(self) -> HealthResponse:
        return await self._one(self._calls.health())

    async def ready(self) -> ReadyResponse:
        return await self._one(self._calls.ready())

    async def version(self) -> VersionResponse:
        return await self._one(self._calls.version())

    async def gpu(self) -> GpuResponse:
        return await self._one(self._calls.gpu())

    async def metrics(self) -> str:
        return await self._one(self._calls.metrics())

    async def stats(self) -> StatsResponse:
        return await self._one(self._calls.stats())

    async def admin_models(self) -> ControlStatus:
        return await self._one(self._calls.admin_models())

    async def config(self) -> ConfigResponse:
        return await self._one(self._calls.config())

    async def load(self, tag: str, make_default: bool = False) -> AdminChangeResult:
        return await self._one(self._calls.load(tag, make_default))

    async def set_default(self, name: str, version: str | None = None) -> AdminChangeResult:
        return await self._one(self._calls.set_default(name, version))

    async def promote(self, tag: str) -> AdminChangeResult:
        return await self._run(self._calls.promote(tag))

    async def traffic(self, name: str, weights: dict[str, int]) -> AdminChangeResult:
        return await self._one(self._calls.traffic(name, weights))

    async def canary(self, tag: str, weight: int) -> AdminChangeResult:
        return await self._run(self._calls.canary(tag, weight))

    async def shadow(
        self, name: str, version: str | None, sample: float = 1.0
    ) -> AdminChangeResult:
        return await self._one(self._calls.shadow(name, version, sample))

    async def compare(self, name: str) -> CompareResponse:
        return await self._one(self._calls.compare(name))

    async def unload(self, tag: str) -> AdminChangeResult:
        return await self._one(self._calls.unload(tag))
