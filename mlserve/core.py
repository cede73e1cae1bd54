"""The serving core, independent of the HTTP layer: models, batching, validation, timing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlserve
from mlserve import drain
from mlserve import observability as obs
from mlserve.admin import AdminAudit
from mlserve.balance import ConnectionBalancer
from mlserve.batching import AdaptiveBatcher, BatchSlice
from mlserve.cache import PredictionCache, make_backend
from mlserve.control import Controller, make_store
from mlserve.delivery import Answers, ShadowRunner
from mlserve.drift import DriftMonitor
from mlserve.errors import MLServeError, ModelLoadError, ValidationError
from mlserve.ratelimit import RateLimiter
from mlserve.registry import LoadedModel, ModelLoader, ModelRegistry
from mlserve.settings import Settings
from runners import load_runner
from runners.base import add_preprocess_ms

log = logging.getLogger("mlserve.core")
# Cleaning more characters than this per request runs off the event loop.
_CLEAN_INLINE_CHARS = 20_000


@dataclass
class Outcome:
    """Predictions for one request, with the model that made them."""

    model: LoadedModel
    rows: BatchSlice
    total_ms: float
    cached: list[bool]

    def predictions(self) -> list[dict]:
        labels = self.rows.labels
        # Rounded in one numpy call: per-element round(float(...)) cost ~0.3 ms per 100 texts.
        probabilities = np.round(self.rows.probabilities, 6).tolist()
        rows = zip(probabilities, self.rows.predicted_index.tolist(), self.cached, strict=True)
        return [
            {
                "cached": cached,
                "label": labels[idx],
                "confidence": probs[idx],
                "probabilities": dict(zip(labels, probs, strict=True)),
            }
            for probs, idx, cached in rows
        ]

    def timing(self) -> dict[str, float]:
        t = self.rows.timing_ms
        stages = ("queue_ms", "preprocess_ms", "model_ms", "postprocess_ms")
        return {**{k: round(t.get(k, 0.0), 3) for k in stages}, "total_ms": round(self.total_ms, 3)}


class ClassificationService:
    """Loads the configured models and answers prediction requests through their batchers.

    It is the :class:`mlserve.control.ModelHost` that the worker's controller drives.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = ModelRegistry(settings.default_model)
        self.balancer = ConnectionBalancer(
            settings.balance_connections and settings.effective_workers > 1
        )
        self.control = Controller(self, make_store(settings))
        # A worker that starts after run-time changes (a restart, a new replica) loads the
        # shared desired state rather than the configured models.
        desired = self.control.initial_state()
        self.loader = ModelLoader(
            desired["models"] if desired else settings.models, self.build, self.registry
        )
        backend = make_backend(settings, on_circuit=obs.observe_cache_circuit)
        self.cache = (
            PredictionCache(backend, settings.cache_prefix, obs.observe_cache) if backend else None
        )
        self.audit = AdminAudit(settings, self.control.worker_id)
        self.rate_limiter = RateLimiter(
            settings.rate_limit,
            settings.admin_rate_limit,
            settings.redis_url,
            settings.cache_prefix,
            obs.observe_rate_limit_event,
        )
        self.shadow = ShadowRunner(
            self._shadow_infer, obs.ShadowMetrics(), shadows=self.registry.shadow_settings
        )
        self.git_revision = _git_revision()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Begin loading models in the background."""
        obs.configure_threads(self.settings)
        self._log_control_namespace()
        self.loader.start()

    def _log_control_namespace(self) -> None:
        where, namespace = self.control.store.where, self.settings.control_namespace
        log.info("model control state: %s (namespace %r)", where, namespace)
        if self.settings.redis_url and self.settings.control_backend != "file":
            if namespace == "default":
                log.warning(
                    "MLSERVE_CONTROL_NAMESPACE is 'default' with Redis on: every deployment on "
                    "this Redis with the default namespace shares (and changes) one set of "
                    "models; give each deployment its own namespace"
                )
            warning = getattr(self.control.store, "eviction_warning", lambda: None)()
            if warning:
                log.warning(warning)

    async def start_control(self) -> None:
        """Start following the shared desired state, and the periodic drift computation
        (inside the server's event loop)."""
        await self._load_first_if_siblings_serve()
        self.control.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._drift_loop()), loop.create_task(self._ready_loop())]

    async def _load_first_if_siblings_serve(self, limit_seconds: float = 600.0) -> None:
        """A worker that joins a server whose other workers already serve (BentoML restarting
        one that died) finishes loading its models before it accepts connections: it runs in
        the server's start-up hook, before uvicorn listens, so the clients that reconnect all
        reach the serving workers instead of getting 503 here while the models load. On a first
        start no sibling serves yet, and /health answers during the loading as before."""
        me = self.control.worker_id
        siblings = self.control.server_workers()
        if not any(r.get("ready") for w, r in siblings.items() if w != me):
            return
        log.info("other workers of this server are serving: loading before accepting requests")
        deadline = time.monotonic() + limit_seconds
        while not self.loader.done and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _ready_loop(self) -> None:
        """Publish readiness as the mlserve_ready gauge once a second."""
        while True:
            obs.observe_ready(self.ready)
            await asyncio.sleep(1.0)

    async def _drift_loop(self) -> None:
        """Bring every loaded model's drift report up to date, off the event loop, every
        MLSERVE_DRIFT_INTERVAL_SECONDS: the gauge is then fresh for every scrape with nobody
        calling the drift route (which shares the same reports)."""
        while True:
            await asyncio.sleep(self.settings.drift_interval_seconds)
            try:
                await asyncio.to_thread(self.refresh_drift)
            except Exception:  # a report that cannot be built must not end the loop
                log.exception("drift computation failed")

    def refresh_drift(self) -> None:
        for model in self.registry.list():
            if model.drift is not None:
                obs.observe_drift(model.tag, model.drift.current()["score"])

    def build(self, tag: str) -> LoadedModel:
        """Load, verify and warm up ``tag``, with a batcher of its own.

        Typed store errors pass through (404 not in the store, 422 checksum mismatch); any
        other failure to read the files becomes :class:`ModelLoadError`.
        """
        try:
            runner = load_runner(tag, warmup=True)
        except MLServeError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{tag} could not be loaded ({type(exc).__name__}); its files may be corrupt"
            ) from exc
        batcher = AdaptiveBatcher(
            runner.infer,
            self.settings.max_batch_size,
            self.settings.max_latency_ms,
            on_batch=lambda n, queue_ms, timing: obs.observe_batch(tag, n, queue_ms, timing),
            on_error=lambda kind: obs.observe_batcher_error(tag, kind),
            max_queue=self.settings.max_queue,
            inline=runner.inline,
            on_reject=lambda reason: obs.observe_overloaded(tag, reason),
        )
        drift = DriftMonitor.from_model_dir(
            runner.model.path,
            window=self.settings.drift_window,
            threshold=self.settings.drift_threshold,
            min_n=self.settings.drift_min_window,
        )
        obs.MODEL_LOADED.labels(model_version=tag).set(1)
        obs.init_batcher_errors(tag)
        return LoadedModel(runner.model.name, runner.model.version, runner, batcher, drift)

    def validate_texts(self, texts: list[str]) -> None:
        limit = self.settings.max_batch_texts
        if not texts:
            raise ValidationError("texts must contain at least one text")
        if len(texts) > limit:
            raise ValidationError(f"at most {limit} texts per batch, got {len(texts)}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValidationError("text must not be empty or whitespace", index=i)
            if len(text) > self.settings.max_text_chars:
                raise ValidationError(
                    f"text is longer than {self.settings.max_text_chars} characters",
                    index=i,
                    length=len(text),
                )

    async def classify(
        self, texts: list[str], model_version: str | None, routing_key: str | None = None
    ) -> Outcome:
        """Validate, resolve the model (a bare name by its traffic split, sticky by
        ``routing_key``), and run ``texts`` as one request through its batcher. A sampled
        request is then offered to its name's shadow version, which runs beside the answer."""
        start = time.perf_counter()
        self.validate_texts(texts)
        self.loader.require_ready()
        with self.registry.acquired(model_version, routing_key) as model:
            outcome = await self._run(model, texts, start)
        if self.shadow.shadow_of(model.tag) is not None:
            rows = outcome.rows
            answers = Answers(rows.labels, rows.probabilities, rows.predicted_index)
            self.shadow.offer(model.tag, texts, answers, outcome.total_ms / 1000.0)
        return outcome

    async def _shadow_infer(self, tag: str, texts: list[str]) -> Answers:
        """A shadow run: the texts through ``tag``'s own batcher, without the cache, the
        prediction metrics or the drift window (those describe what clients were answered)."""
        with self.registry.acquired(tag) as model:
            cleaned, _ = await self._clean(model, texts)
            rows = await model.batcher.submit(cleaned, self.settings.infer_timeout_seconds)
        return Answers(rows.labels, rows.probabilities, rows.predicted_index)

    def serve(self, model: LoadedModel) -> None:
        """Put a built model into the registry (not as default unless its name is new)."""
        self.registry.add(model)
        self.loader.status[model.tag] = "ready"

    async def retire(self, tag: str) -> None:
        """Take ``tag`` out of this worker's service, let the requests that hold it finish,
        then free it. (The fleet-wide, audited unload is ``control.unload``.)"""
        name, version = tag.split(":", 1)
        model = self.registry.remove(name, version)
        deadline = time.monotonic() + self.settings.infer_timeout_seconds + 1.0
        while model.active and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await model.batcher.aclose()
        model.runner.close()
        obs.MODEL_LOADED.labels(model_version=tag).set(0)
        self.loader.status.pop(tag, None)
        del model
        await asyncio.to_thread(_reclaim_memory)

    async def _clean(self, model: LoadedModel, texts: list[str]) -> tuple[list[str], float]:
        """The texts as the model sees them, and the milliseconds cleaning took."""
        start = time.perf_counter()
        if sum(map(len, texts)) > _CLEAN_INLINE_CHARS:
            cleaned = await asyncio.to_thread(model.runner.clean, texts)
        else:
            cleaned = model.runner.clean(texts)
        return cleaned, (time.perf_counter() - start) * 1000.0

    async def _run(self, model: LoadedModel, texts: list[str], start: float) -> Outcome:
        # The deadline runs from the request's arrival: time spent before the batcher counts.
        deadline = start + self.settings.infer_timeout_seconds
        cleaned, clean_ms = await self._clean(model, texts)
        if self.cache is None:
            rows = await model.batcher.submit(cleaned, deadline - time.perf_counter())
            cached = [False] * len(texts)
        else:
            timing: dict[str, float] = {}

            async def compute(missing: list[str]) -> list[dict]:
                part = await model.batcher.submit(missing, deadline - time.perf_counter())
                timing.update(part.timing_ms, batch_size=part.batch_size)
                return [
                    {"p": p.tolist(), "i": int(i)}
                    for p, i in zip(part.probabilities, part.predicted_index, strict=True)
                ]

            runner = model.runner
            entries, cached = await self.cache.predict(
                runner.identity, cleaned, len(runner.labels), compute
            )
            rows = BatchSlice(
                probabilities=np.array([e["p"] for e in entries], dtype=np.float64),
                predicted_index=np.array([e["i"] for e in entries], dtype=np.int64),
                labels=runner.labels,
                timing_ms=timing,
                batch_size=int(timing.get("batch_size", 0)),
            )
        rows.timing_ms = dict(rows.timing_ms)
        add_preprocess_ms(rows.timing_ms, clean_ms)
        idx = rows.predicted_index
        confidence = rows.probabilities[np.arange(len(idx)), idx]
        obs.observe_predictions(model.tag, [rows.labels[int(i)] for i in idx], confidence)
        if model.drift is not None:
            model.drift.observe(texts, idx, confidence)
        return Outcome(model, rows, (time.perf_counter() - start) * 1000.0, cached)

    def drift_report(self, name: str, version: str) -> dict:
        """A loaded model's drift report for this worker's window as it is now (reused while
        no input arrived since it was computed). CPU work: call it off the event loop."""
        model = self.registry.get(name, version)
        if model.drift is None:
            return {"method": "psi", "available": False, "reason": "model has no drift reference"}
        report = model.drift.current()
        obs.observe_drift(model.tag, report["score"])
        return {"available": True, **report}

    def stats(self) -> dict:
        """Figures for /admin/stats: metrics merged over all workers, plus this worker's models,
        defaults and drift."""
        import os

        from mlserve.admin import collect_stats

        models = self.registry.list()
        return {
            **collect_stats(),
            "drift": {m.tag: self.drift_report(m.name, m.version) for m in models},
            "cache_backend": self.cache.backend.status() if self.cache else {"backend": "off"},
            "worker": {
                "pid": os.getpid(),
                "loaded": [m.tag for m in models],
                "defaults": self.registry.defaults(),
            },
            "control": self.control.status(),
        }

    def version_info(self) -> dict:
        import bentoml

        return {
            "service": "mlserve",
            "version": mlserve.__version__,
            "git_revision": self.git_revision,
            "bentoml_version": bentoml.__version__,
            "default_model": self.settings.default_model,
            "default_versions": self.registry.defaults() or self.settings.default_versions,
        }

    @property
    def ready(self) -> bool:
        """Every start-up model is loaded, the worker follows the shared model state, and so
        do the other workers of this server."""
        return (
            self.loader.ready
            and self.control.applied >= 0
            and self.control.server_ready
            and not drain.STATE.draining
        )

    def readiness(self) -> dict:
        return {
            "ready": self.ready,
            "draining": drain.STATE.draining,
            "models": dict(self.loader.status),
            "errors": dict(self.loader.errors),
            "control": {
                "store": self.control.store.where,
                "namespace": self.settings.control_namespace,
                "generation": self.control.applied,
                "errors": self.control.errors,
                "store_error": self.control.last_error,
            },
            # A failing cache never makes the service unready: requests go on without it.
            "cache": self.cache.backend.status() if self.cache else {"backend": "off"},
            # Nor a failing rate limiter: it lets traffic through (fail open).
            "rate_limit": self.rate_limiter.status(),
        }

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.shadow.aclose()
        self.audit.flush()
        await self.control.aclose()
        for model in self.registry.list():
            await model.batcher.aclose()
            model.runner.close()


def _reclaim_memory() -> None:
    """Free an unloaded model's cycles too. Models loaded at start-up were frozen out of the
    collector's reach (see ModelLoader), so thaw, collect, and freeze what is left again."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _git_revision() -> str:
    """The checkout's commit, or MLSERVE_GIT_REVISION baked in at build time, or 'unknown'."""
    import os

    if rev := os.environ.get("MLSERVE_GIT_REVISION"):
        return rev
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
