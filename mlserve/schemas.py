"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class Timing(BaseModel):
    """Where the time went, in milliseconds. Batch stages are shared by the batch's requests."""

    queue_ms: float
    preprocess_ms: float
    model_ms: float
    postprocess_ms: float
    total_ms: float


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    text: StrictStr = Field(description="The text to classify.")
    model_version: StrictStr | None = Field(
        None, description="name:version, a bare name (its default version), or omitted."
    )


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    texts: list[StrictStr] = Field(description="1 to MLSERVE_MAX_BATCH_TEXTS texts.")
    model_version: StrictStr | None = None


class Prediction(BaseModel):
    cached: bool = Field(description="Whether the answer came from the prediction cache.")
    label: str
    confidence: float
    probabilities: dict[str, float]


class PredictResponse(Prediction):
    model_config = ConfigDict(protected_namespaces=())

    latency_ms: float
    model_version: str
    request_id: str
    timing: Timing


class BatchPredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    predictions: list[Prediction]
    total_latency_ms: float
    model_version: str
    request_id: str
    timing: Timing


class ErrorBody(BaseModel):
    error: str = Field(description="Stable machine-readable code, e.g. validation_error.")
    message: str = Field(description="What was wrong, for a person.")
    details: dict | None = None
    request_id: str | None = None


class LoadModelRequest(BaseModel):
    """``POST /admin/models/load``: a store tag only, never a path, URL or file."""

    model_config = ConfigDict(extra="forbid")

    tag: StrictStr = Field(description="name:version of a model in the server's store.")
    make_default: bool = Field(False, description="Also make it its name's default version.")


class SetDefaultRequest(BaseModel):
    """``POST /admin/models/default``."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    version: StrictStr


class UnloadModelRequest(BaseModel):
    """``POST /admin/models/unload``."""

    model_config = ConfigDict(extra="forbid")

    tag: StrictStr
