"""The loaded models of one worker, keyed by (name, version), with a default version per name."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlserve.batching import AdaptiveBatcher
from mlserve.delivery import Shadows, Traffic, pick
from mlserve.drift import DriftMonitor
from mlserve.errors import (
    ModelNotFoundError,
    ModelStateError,
    ServiceUnavailableError,
    ValidationError,
)
from mlserve.settings import NAME_RE, TAG_RE
from runners.base import Runner


@dataclass
class LoadedModel:
    """A runner that is loaded, warmed up and ready for traffic."""

    name: str
    version: str
    runner: Runner
    batcher: AdaptiveBatcher
    drift: DriftMonitor | None = None
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    """Requests that resolved this model and have not finished; guarded by the registry lock."""

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def metadata(self) -> dict[str, Any]:
        return self.runner.model.metadata

    def summary(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "tag": self.tag,
            "name": self.name,
            "version": self.version,
            "runner_family": meta["runner_family"],
            "estimator": meta["estimator"]["name"],
            "labels": meta["labels"],
            "test_metrics": {
                k: meta.get("metrics", {}).get("test", {}).get(k)
                for k in ("accuracy", "f1_macro", "pr_auc", "ece")
            },
            "training_date": meta["training_date"],
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "identity": self.runner.identity,
            "decision_rule": self.decision,
        }

    @property
    def decision(self) -> dict[str, Any]:
        """How the label is chosen from the probabilities (see Calibrator.describe_decision)."""
        return self.runner.calibrator.describe_decision(self.runner.labels)


class ModelRegistry:
    """Resolves ``model_version`` strings to loaded models.

    ``None`` means the service default; a bare name means that name's default version, or a
    version chosen by the name's traffic split when it has one (:func:`mlserve.delivery.pick`);
    and ``name:version`` means exactly that version, never re-routed.
    """

    def __init__(self, service_default: str):
        self.service_default = service_default
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._defaults: dict[str, str] = {}
        self._traffic: Traffic = {}
        self._shadows: Shadows = {}
        self._lock = threading.Lock()

    def set_delivery(self, traffic: Traffic, shadows: Shadows) -> None:
        """Take the traffic splits and shadow settings of the control state."""
        with self._lock:
            self._traffic = {name: dict(w) for name, w in traffic.items() if w}
            self._shadows = {name: dict(s) for name, s in shadows.items() if s}
            self._set_background()

    def _set_background(self) -> None:
        """A shadow version that serves no client (neither its name's default nor weighted in a
        split) computes on spare CPU only: its runs must never slow the answers. Every other
        version runs at its normal priority. Call with the lock held."""
        for (name, version), model in self._models.items():
            shadow = self._shadows.get(name, {}).get("version") == version
            serves = self._defaults.get(name) == version or (
                self._traffic.get(name, {}).get(version, 0) > 0
            )
            model.batcher.set_background(shadow and not serves)

    def traffic(self) -> Traffic:
        with self._lock:
            return {name: dict(w) for name, w in self._traffic.items()}

    def shadows(self) -> Shadows:
        with self._lock:
            return {name: dict(s) for name, s in self._shadows.items()}

    def shadow_settings(self) -> Shadows:
        """The shadow settings without a copy, for the request path: replaced, never changed in
        place, so reading them needs no lock. Do not modify."""
        return self._shadows

    def add(self, model: LoadedModel, make_default: bool = False) -> None:
        with self._lock:
            self._models[(model.name, model.version)] = model
            if make_default or model.name not in self._defaults:
                self._defaults[model.name] = model.version
            self._set_background()

    def set_default(self, name: str, version: str) -> None:
        """Make a loaded version its name's default."""
        with self._lock:
            if (name, version) not in self._models:
                raise ModelNotFoundError(f"model {name}:{version} is not loaded")
            self._defaults[name] = version
            self._set_background()

    def remove(self, name: str, version: str) -> LoadedModel:
        """Take a version out of service: no request can resolve it afterwards.

        The default version of a name cannot be removed while another version remains;
        removing the last version of a name drops the name.
        """
        with self._lock:
            found = self._models.get((name, version))
            if found is None:
                raise ModelNotFoundError(f"model {name}:{version} is not loaded")
            others = [v for (n, v) in self._models if n == name and v != version]
            if self._defaults.get(name) == version and others:
                raise ModelStateError(
                    f"{name}:{version} is the default of {name!r}; make another version the "
                    "default first"
                )
            del self._models[(name, version)]
            if not others:
                self._defaults.pop(name, None)
            return found

    @contextlib.contextmanager
    def acquired(
        self, model_version: str | None, routing_key: str | None = None
    ) -> Iterator[LoadedModel]:
        """Resolve ``model_version`` and hold the model for the length of the ``with`` block.

        An unload waits until no request holds the model before it closes it, so a request
        that resolved a model is always served by that model. ``routing_key`` makes a traffic
        split's choice sticky.
        """
        model = self._resolve(model_version, hold=True, routing_key=routing_key)
        try:
            yield model
        finally:
            with self._lock:
                model.active -= 1

    def resolve(self, model_version: str | None) -> LoadedModel:
        """The loaded model a request asks for, or a typed error."""
        return self._resolve(model_version, hold=False)

    def _resolve(
        self, model_version: str | None, hold: bool, routing_key: str | None = None
    ) -> LoadedModel:
        ref = model_version if model_version not in (None, "") else self.service_default
        if not isinstance(ref, str) or not (TAG_RE.match(ref) or NAME_RE.match(ref)):
            raise ValidationError(
                "model_version must be a model name or name:version of lowercase letters, "
                "digits, '_', '-' or '.'"
            )
        name, _, version = ref.partition(":")
        with self._lock:
            if not version:
                weights = self._traffic.get(name)
                chosen = pick(weights, routing_key) if weights else None
                # A weighted version this worker does not serve (yet): the default serves.
                if chosen is not None and (name, chosen) in self._models:
                    version = chosen
                else:
                    version = self._defaults.get(name, "")
                if not version:
                    raise ModelNotFoundError(f"no version of model {name!r} is loaded")
            found = self._models.get((name, version))
            if found is not None and hold:
                found.active += 1
        if found is None:
            raise ModelNotFoundError(f"model {name}:{version} is not loaded")
        return found

    def get(self, name: str, version: str) -> LoadedModel:
        with self._lock:
            found = self._models.get((name, version))
        if found is None:
            raise ModelNotFoundError(f"model {name}:{version} is not loaded")
        return found

    def list(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: (m.name, m.version))

    def tags(self) -> list[str]:
        with self._lock:
            return sorted(f"{n}:{v}" for n, v in self._models)

    def defaults(self) -> dict[str, str]:
        with self._lock:
            return dict(self._defaults)

    def __len__(self) -> int:
        return len(self._models)


class ModelLoader:
    """Loads the configured tags in a background thread, so /health answers during start-up."""

    def __init__(
        self, tags: list[str], build: Callable[[str], LoadedModel], registry: ModelRegistry
    ):
        self.tags = list(tags)
        self._build = build
        self._registry = registry
        self.status: dict[str, str] = dict.fromkeys(self.tags, "pending")
        self.errors: dict[str, str] = {}
        self.done = False  # the start-up loads have all finished (well or not)
        self._thread = threading.Thread(target=self._run, name="mlserve-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        for tag in self.tags:
            self.status[tag] = "loading"
            try:
                self._registry.add(self._build(tag))
                self.status[tag] = "ready"
            except Exception as exc:  # reported by /ready
                self.status[tag] = "failed"
                self.errors[tag] = getattr(exc, "message", None) or type(exc).__name__
        # The models are many long-lived objects (torch modules, vocabularies). Move them out
        # of the collector's reach, and collect young garbage less often: with Python's
        # defaults, collections triggered by request garbage stalled the event loop for
        # 200-400 ms (p99 at 32 clients 430 ms; with this, 40 ms; see BENCHMARK.md).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        self.done = True

    @property
    def ready(self) -> bool:
        return bool(self.tags) and all(s == "ready" for s in self.status.values())

    def require_ready(self) -> None:
        if not len(self._registry):
            raise ServiceUnavailableError(
                "no model is loaded yet; retry shortly", models=self.status
            )
