"""Request and response bodies of the HTTP API: the contract, declared once.

The routes (``mlserve.http``) validate requests with these models and FastAPI derives the OpenAPI
description from the same models, so the two cannot drift apart. The typed client
(``mlserve.client``) parses responses with them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

DecisionRuleName = Literal["argmax", "prior_corrected_argmax"]

# --- requests ---------------------------------------------------------------------------------

RoutingKey = Annotated[
    StrictStr | None,
    Field(
        max_length=256,
        description="Makes a traffic split sticky: requests with the same key get the same "
        "version while the weights stay the same (the X-Routing-Key header does the same; this "
        "field wins). Without one, a split chooses at random per request.",
    ),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [{"text": "This medication worked wonders, no side effects at all"}]
        },
    )

    text: StrictStr = Field(
        description="The text to classify (not empty, at most MLSERVE_MAX_TEXT_CHARS characters)."
    )
    model_version: StrictStr | None = Field(
        None,
        description="name:version, a bare name (its default version, or a version chosen by "
        "the name's traffic split), or omitted (MLSERVE_DEFAULT_MODEL).",
    )
    routing_key: RoutingKey = None


class BatchPredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {"texts": ["Great drug, no side effects", "Made me dizzy"], "model_version": None}
            ]
        },
    )

    texts: list[StrictStr] = Field(description="1 to MLSERVE_MAX_BATCH_TEXTS texts.")
    model_version: StrictStr | None = Field(
        None, description="name:version, a bare name, or omitted (the default model)."
    )
    routing_key: RoutingKey = None


class LoadModelRequest(BaseModel):
    """``POST /admin/models/load``: a store tag only, never a path, URL or file."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"tag": "sentiment:v2"}]}
    )

    tag: StrictStr = Field(description="name:version of a model in the server's store.")
    make_default: bool = Field(False, description="Also make it its name's default version.")


class SetDefaultRequest(BaseModel):
    """``POST /admin/models/default``."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "sentiment", "version": "v2"}]}
    )

    name: StrictStr
    version: StrictStr


class UnloadModelRequest(BaseModel):
    """``POST /admin/models/unload``."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"tag": "sentiment:v1"}]}
    )

    tag: StrictStr


class TrafficRequest(BaseModel):
    """``POST /admin/models/traffic``: split a name's requests over its loaded versions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "sentiment", "weights": {"v1": 90, "v2": 10}},
                {"name": "sentiment", "weights": {}},
            ]
        },
    )

    name: StrictStr = Field(description="A model name with loaded versions.")
    weights: dict[StrictStr, Annotated[StrictInt, Field(ge=0, le=100)]] = Field(
        max_length=64,
        description="Percent of the bare-name requests each loaded version gets, summing to "
        "100; {} clears the split (the default version serves them all again).",
    )


class ShadowRequest(BaseModel):
    """``POST /admin/models/shadow``: run a share of a name's requests on another version too."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "sentiment", "version": "v2", "sample": 1.0},
                {"name": "sentiment", "version": None},
            ]
        },
    )

    name: StrictStr
    version: StrictStr | None = Field(
        description="A loaded version other than the name's default; null clears the shadow."
    )
    sample: float = Field(
        1.0, gt=0, le=1, description="The share of the primary's requests also run on it."
    )


# --- predictions ------------------------------------------------------------------------------


class Timing(BaseModel):
    """Where the time went, in milliseconds. Batch stages are shared by the batch's requests."""

    queue_ms: float
    preprocess_ms: float
    model_ms: float
    postprocess_ms: float
    total_ms: float


class Prediction(BaseModel):
    cached: bool = Field(description="Whether the answer came from the prediction cache.")
    label: str = Field(description="The predicted label, chosen by the model's decision rule.")
    confidence: float = Field(description="The calibrated probability of `label`.")
    probabilities: dict[str, float] = Field(description="Calibrated probability of each label.")


_PREDICTION_EXAMPLE = {
    "cached": False,
    "label": "positive",
    "confidence": 0.96,
    "probabilities": {"negative": 0.03, "neutral": 0.01, "positive": 0.96},
}
_TIMING_EXAMPLE = {
    "queue_ms": 0.03,
    "preprocess_ms": 0.9,
    "model_ms": 0.2,
    "postprocess_ms": 0.1,
    "total_ms": 1.4,
}


class PredictResponse(Prediction):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    **_PREDICTION_EXAMPLE,
                    "latency_ms": 1.4,
                    "model_version": "sentiment:v1",
                    "decision_rule": "prior_corrected_argmax",
                    "request_id": "8c0f6f7e2a5b4c1d9e3f0a1b2c3d4e5f",
                    "timing": _TIMING_EXAMPLE,
                }
            ]
        },
    )

    latency_ms: float = Field(description="Server-side time of the request, in milliseconds.")
    model_version: str = Field(description="The name:version that computed the answer.")
    decision_rule: DecisionRuleName = Field(
        description="How `label` was chosen: `argmax` (the most probable label) or "
        "`prior_corrected_argmax` (probability x weight, weights proportional to 1 / the "
        "label's training share; see GET /models/{name}/{version})."
    )
    request_id: str
    timing: Timing


class BatchPredictResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "predictions": [_PREDICTION_EXAMPLE],
                    "total_latency_ms": 2.1,
                    "model_version": "sentiment:v1",
                    "decision_rule": "prior_corrected_argmax",
                    "request_id": "8c0f6f7e2a5b4c1d9e3f0a1b2c3d4e5f",
                    "timing": _TIMING_EXAMPLE,
                }
            ]
        },
    )

    predictions: list[Prediction] = Field(description="One per input text, in input order.")
    total_latency_ms: float
    model_version: str
    decision_rule: DecisionRuleName
    request_id: str
    timing: Timing


# --- errors -----------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "validation_error",
                    "message": "text must not be empty or whitespace",
                    "details": {"index": 0},
                    "request_id": "8c0f6f7e2a5b4c1d9e3f0a1b2c3d4e5f",
                }
            ]
        }
    )

    error: str = Field(description="Stable machine-readable code, e.g. validation_error.")
    message: str = Field(description="What was wrong, for a person.")
    details: dict[str, Any] | None = Field(None, description="Structured detail, when any.")
    request_id: str | None = Field(None, description="The request's id (X-Request-ID).")


# --- models -----------------------------------------------------------------------------------


class DecisionRule(BaseModel):
    rule: DecisionRuleName
    weights: dict[str, float] = Field(description="The weight of each label.")
    description: str


class ModelSummary(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    tag: str
    name: str
    version: str
    runner_family: str
    estimator: str
    labels: list[str]
    test_metrics: dict[str, float | None]
    training_date: str
    loaded_at: str
    identity: str = Field(description="Digest of the model's content (files, labels, cleaning).")
    decision_rule: DecisionRule


class ModelDetail(ModelSummary):
    metadata: dict[str, Any] = Field(
        description="The model's stored metadata (a training file's path is cut to its name)."
    )


class ModelsResponse(BaseModel):
    models: list[ModelSummary]
    defaults: dict[str, str] = Field(description="The default version of each loaded name.")
    service_default: str = Field(description="MLSERVE_DEFAULT_MODEL.")


class DriftReport(BaseModel):
    available: bool
    method: str = "psi"
    reason: str | None = None
    score: float | None = None
    threshold: float | None = None
    drifted: bool | None = None
    window_size: int | None = None
    min_window: int | None = None
    features: dict[str, float] | None = None
    computed_at: float | None = None


# --- probes -----------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    ready: bool
    draining: bool = Field(
        False, description="True once the worker got SIGTERM: it finishes what it has and exits."
    )
    models: dict[str, str] = Field(description="Each start-up model's state.")
    errors: dict[str, str] = Field(description="Load errors by model.")
    control: dict[str, Any] = Field(description="The control path: store, namespace, generation.")
    cache: dict[str, Any] = Field(description="The cache backend's state.")
    rate_limit: dict[str, Any] = Field(
        default_factory=dict, description="The rate limiter's state (it fails open)."
    )


class VersionResponse(BaseModel):
    service: str
    version: str
    git_revision: str
    bentoml_version: str
    default_model: str
    default_versions: dict[str, str]


class GpuDevice(BaseModel):
    index: int
    name: str
    memory_used_mb: float
    memory_total_mb: float
    utilization_percent: float | None = None
    temperature_c: float | None = None


class GpuResponse(BaseModel):
    available: bool
    device: str = Field(description="`cuda` with an NVIDIA GPU, else `cpu`.")
    reason: str | None = None
    driver_version: str | None = None
    gpus: list[GpuDevice] = Field(default_factory=list)


# --- admin ------------------------------------------------------------------------------------


class WorkerState(BaseModel):
    generation: int
    loaded: list[str]
    defaults: dict[str, str]


class ShadowSetting(BaseModel):
    version: str
    sample: float


class AdminChangeResult(BaseModel):
    action: str
    complete: bool = Field(description="Every live worker serves the change (200; else 202).")
    generation: int
    models: list[str]
    defaults: dict[str, str]
    traffic: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Each name's traffic split (percent by version)."
    )
    shadows: dict[str, ShadowSetting] = Field(
        default_factory=dict, description="Each name's shadow version and sample."
    )
    workers: dict[str, WorkerState]
    lagging: list[str]
    failed: dict[str, dict[str, str]]


class LatencySummary(BaseModel):
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None


class PairComparison(BaseModel):
    primary: str = Field(description="The version that answered the clients.")
    shadow: str
    comparisons: int = Field(description="Texts answered by both.")
    requests: int = Field(description="Requests compared.")
    agreement_rate: float | None = Field(description="Share of texts with the same label.")
    mean_abs_probability_difference: float | None = Field(
        description="Mean over texts of the mean absolute difference of the probabilities."
    )
    labels: dict[str, dict[str, int]] = Field(
        description="Label distribution of each role (`primary`, `shadow`) on compared texts."
    )
    latency: dict[str, LatencySummary] = Field(
        description="Per role: the primary's request latency and the shadow's run latency."
    )
    shadow_errors: int
    shadow_dropped: int = Field(
        description="Shadow runs dropped: queue full, shadow overloaded, or shadow cleared."
    )


class CompareResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "sentiment",
                    "default": "v1",
                    "traffic": {"v1": 90, "v2": 10},
                    "shadow": {"version": "v2", "sample": 1.0},
                    "pairs": [],
                }
            ]
        }
    )

    name: str
    default: str | None = Field(description="The name's default (primary) version.")
    traffic: dict[str, int] = Field(description="The traffic split; {} when there is none.")
    shadow: ShadowSetting | None
    pairs: list[PairComparison] = Field(
        description="Every (primary, shadow) pair of this name seen by this server's workers "
        "since they started."
    )


class ControlStatus(BaseModel):
    store: str
    desired: dict[str, Any] | None = None
    workers: dict[str, dict[str, Any]] | None = None
    error: str | None = None


class StatsResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    requests: int
    error_rate: float
    routes: dict[str, Any]
    models: dict[str, Any]
    errors: dict[str, int]
    cache: dict[str, Any]
    drift: dict[str, Any]
    cache_backend: dict[str, Any]
    worker: dict[str, Any]
    control: dict[str, Any]
    comparisons: list[PairComparison] = Field(default_factory=list)


class ConfigResponse(BaseModel):
    config_file: str | None
    values: dict[str, Any]
    sources: dict[str, Any]
