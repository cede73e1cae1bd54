"""Typed errors, each with the HTTP status it maps to. The service turns them into JSON bodies."""

from __future__ import annotations


class MLServeError(Exception):
    """Base class: ``status`` is the HTTP code, ``code`` a stable machine-readable name."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: object):
        super().__init__(message)
        self.message = message
        self.details = details

    headers: dict[str, str] = {}  # noqa: RUF012 - extra response headers (e.g. Retry-After)

    def to_dict(self, request_id: str | None = None) -> dict[str, object]:
        return error_body(self.code, self.message, request_id, self.details)


def error_body(
    code: str,
    message: str,
    request_id: str | None = None,
    details: dict[str, object] | None = None,
) -> dict[str, object]:
    """The one JSON error body of every response: ``{"error", "message"[, "details"]
    [, "request_id"]}``. Every error answer of the service is built here."""
    body: dict[str, object] = {"error": code, "message": message}
    if details:
        body["details"] = details
    if request_id is not None:
        body["request_id"] = request_id
    return body


class BadRequestError(MLServeError):
    status, code = 400, "bad_request"


class DataError(BadRequestError):
    """A training or upload file that cannot be used (missing columns, empty, one class, ...)."""

    code = "bad_data"


class ModelNotFoundError(MLServeError):
    status, code = 404, "model_not_found"


class RequestTimeoutError(MLServeError):
    """The body did not arrive within MLSERVE_BODY_TIMEOUT_SECONDS (or stopped short of its
    announced length)."""

    status, code = 408, "request_timeout"


class HeadersTooLargeError(MLServeError):
    status, code = 431, "headers_too_large"


class PayloadTooLargeError(MLServeError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(MLServeError):
    status, code = 415, "unsupported_media_type"


class ValidationError(MLServeError):
    status, code = 422, "validation_error"


class InvalidTagError(ValidationError, ValueError):
    """Not a ``name:version`` store tag of safe characters (a ``ValueError`` too, for callers
    outside the HTTP layer)."""


class RateLimitedError(MLServeError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int, **details: object):
        super().__init__(message, retry_after=retry_after, **details)
        self.headers = {"Retry-After": str(retry_after)}


class ServiceUnavailableError(MLServeError):
    status, code = 503, "unavailable"


class OverloadedError(ServiceUnavailableError):
    """Refused at once: the request could not be served within its deadline, or the model
    version's queue is full. ``Retry-After`` says when to try again."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: int, **details: object):
        super().__init__(message, retry_after=retry_after, **details)
        self.headers = {"Retry-After": str(retry_after)}


class InferenceTimeoutError(MLServeError):
    status, code = 504, "inference_timeout"


class ModelStoreError(MLServeError):
    """The store refused an operation (for example, a tag that already exists)."""

    status, code = 409, "model_store_conflict"


class ModelIntegrityError(MLServeError):
    """A stored model's files do not match their recorded sha256, or use an unsafe format."""

    status, code = 422, "model_integrity"


class ModelStateError(MLServeError):
    """A model-management request that the current state refuses (unloading a default, the
    last loaded version, or loading past MLSERVE_MAX_LOADED_MODELS)."""

    status, code = 409, "model_state_conflict"


class ModelLoadError(MLServeError):
    """A stored model that exists but could not be loaded (corrupt or unreadable files)."""

    status, code = 422, "model_load_failed"
