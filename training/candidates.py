"""Candidate models. Each fits on the training split and returns raw (uncalibrated) probabilities.

Classical candidates share one TF-IDF vectorizer; the transformer candidates are a linear head
on frozen MiniLM embeddings (``minilm``) and MiniLM fine-tuned end to end with its head
(``minilm_ft``, see :mod:`training.finetune`). Each knows how to write its files in its runner
family's format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.class_weight import compute_sample_weight

CLASSICAL = ("logreg", "random_forest", "xgboost", "lightgbm")
TRANSFORMER = ("minilm", "minilm_ft")
ALL_CANDIDATES = CLASSICAL + TRANSFORMER


@dataclass
class Fitted:
    """A fitted candidate: raw-probability function over *cleaned* texts, and how to save it."""

    name: str
    family: str
    kind: str
    params: dict[str, Any]
    raw_proba: Callable[[list[str]], np.ndarray]
    write: Callable[[Path], None]
    extra_meta: dict[str, Any] = field(default_factory=dict)


def _sklearn_grid_lr(
    x_train: Any, y_train: np.ndarray, x_val: Any, y_val: np.ndarray, seed: int, grid: tuple
) -> tuple[Any, float]:
    """Logistic regression with class-balanced weights; C chosen on validation log-loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    best, best_loss, best_c = None, np.inf, grid[0]
    labels = list(range(int(max(y_train.max(), y_val.max())) + 1))
    for c in grid:
        lr = LogisticRegression(C=c, max_iter=3000, class_weight="balanced", random_state=seed)
        lr.fit(x_train, y_train)
        loss = log_loss(y_val, lr.predict_proba(x_val), labels=labels)
        if loss < best_loss:
            best, best_loss, best_c = lr, loss, c
    return best, best_c


def fit_classical(
    kind: str,
    vectorizer: Any,
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    seed: int,
    n_jobs: int,
) -> Fitted:
    """Fit one TF-IDF candidate."""
    from runners.classical import save_estimator

    weights = compute_sample_weight("balanced", y_train)
    if kind == "logreg":
        est, c = _sklearn_grid_lr(x_train, y_train, x_val, y_val, seed, (1.0, 4.0, 16.0))
        params = {"C": c, "class_weight": "balanced", "max_iter": 3000}
    elif kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        params = {"n_estimators": 300, "class_weight": "balanced_subsample", "min_samples_leaf": 1}
        est = RandomForestClassifier(**params, n_jobs=n_jobs, random_state=seed)
        est.fit(x_train, y_train)
    elif kind == "xgboost":
        import xgboost as xgb

        params = {
            "n_estimators": 300,
            "max_depth": 6,
            "learning_rate": 0.1,
            "subsample": 0.9,
            "colsample_bytree": 0.5,
            "tree_method": "hist",
        }
        est = xgb.XGBClassifier(**params, n_jobs=n_jobs, random_state=seed)
        est.fit(x_train, y_train, sample_weight=weights)
    elif kind == "lightgbm":
        import lightgbm as lgb

        params = {
            "n_estimators": 300,
            "learning_rate": 0.05,
            "num_leaves": 31,
            "min_child_samples": 5,
            "colsample_bytree": 0.5,
            "class_weight": "balanced",
        }
        est = lgb.LGBMClassifier(**params, n_jobs=n_jobs, random_state=seed, verbose=-1)
        est.fit(x_train, y_train)
    else:
        raise ValueError(f"unknown classical candidate {kind!r}")

    def write(directory: Path) -> None:
        vectorizer.save(directory / "tfidf.json")
        save_estimator(est, kind, directory)

    return Fitted(
        name=f"tfidf+{kind}",
        family="classical",
        kind=kind,
        params=params,
        raw_proba=lambda texts: est.predict_proba(vectorizer.transform(texts)),
        write=write,
    )


def fit_linear_head(
    embed: Callable[[list[str]], np.ndarray],
    emb_train: np.ndarray,
    y_train: np.ndarray,
    emb_val: np.ndarray,
    y_val: np.ndarray,
    seed: int,
    *,
    name: str,
    family: str,
    kind: str,
    encoder: str,
    write_encoder: Callable[[Path], None],
    max_tokens: int,
) -> Fitted:
    """A class-balanced linear head on sentence embeddings (``embed``: texts to an (n, d)
    array), C chosen on validation log-loss; ``write_encoder`` writes the encoder's files."""
    from runners.transformer import head_proba, save_head

    lr, c = _sklearn_grid_lr(emb_train, y_train, emb_val, y_val, seed, (1.0, 4.0, 16.0, 64.0))
    weight, bias = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)

    def raw_proba(texts: list[str]) -> np.ndarray:
        return head_proba(np.asarray(embed(texts), dtype=np.float64) @ weight.T + bias)

    def write(directory: Path) -> None:
        write_encoder(directory)
        save_head(weight, bias, directory / "head.safetensors")

    return Fitted(
        name=name,
        family=family,
        kind=kind,
        params={"C": c, "class_weight": "balanced", "encoder": encoder},
        raw_proba=raw_proba,
        write=write,
        extra_meta={"max_tokens": max_tokens},
    )


def fit_minilm(
    encoder: Any,
    emb_train: np.ndarray,
    y_train: np.ndarray,
    emb_val: np.ndarray,
    y_val: np.ndarray,
    seed: int,
    max_tokens: int,
) -> Fitted:
    """A linear head on frozen, normalised MiniLM embeddings."""
    from runners.transformer import copy_encoder

    return fit_linear_head(
        lambda texts: encoder.embed(texts).cpu().numpy(),
        emb_train,
        y_train,
        emb_val,
        y_val,
        seed,
        name="minilm+linear_head",
        family="transformer",
        kind="minilm_linear_head",
        encoder="all-MiniLM-L6-v2 (frozen)",
        write_encoder=lambda directory: copy_encoder(directory / "encoder"),
        max_tokens=max_tokens,
    )


def fit_minilm_ft(
    source_dir: Path,
    t_train: list[str],
    y_train: np.ndarray,
    t_val: list[str],
    y_val: np.ndarray,
    n_classes: int,
    seed: int,
    max_tokens: int,
    init_head: tuple[np.ndarray, np.ndarray],
    *,
    cfg: Any = None,
    threads: int = 2,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Fitted:
    """MiniLM fine-tuned end to end with a linear head (:func:`training.finetune.finetune`).

    The encoder is written to a temporary folder at once and read back through
    :class:`runners.transformer.MiniLMEncoder`, so the probabilities evaluated here are computed
    exactly as the transformer runner will compute them; ``write`` copies that folder. The
    served head is then refitted on the fine-tuned embeddings (:func:`fit_linear_head`)."""
    import shutil
    import tempfile
    import weakref

    from runners.transformer import MiniLMEncoder
    from training.finetune import FineTuneConfig, finetune

    cfg = cfg or FineTuneConfig()
    tuned = finetune(
        source_dir,
        t_train,
        y_train,
        t_val,
        y_val,
        n_classes,
        seed=seed,
        max_tokens=max_tokens,
        init_head=init_head,
        cfg=cfg,
        threads=threads,
        device=device,
        log=log,
    )
    folder = Path(tempfile.mkdtemp(prefix="mlserve-finetuned-"))
    tuned.save_encoder(folder, source_dir)
    del tuned.model  # the encoder below reads the saved files back
    encoder = MiniLMEncoder(folder, device, max_tokens=max_tokens)

    # The validation texts are embedded once: the head's fit below and the calibrator's (which
    # the caller fits on these same texts, this same list) share them.
    val_embeddings = encoder.embed(t_val).cpu().numpy()

    def embed(texts: list[str]) -> np.ndarray:
        if texts is t_val:
            return val_embeddings
        return encoder.embed(texts).cpu().numpy()

    # The served head is refitted on the fine-tuned embeddings by the one linear-head fit of
    # every encoder variant (frozen, fine-tuned, int8): `mlserve optimize` refits it the same
    # way on the int8 embeddings, so its quality gate compares quantisation alone.
    fitted = fit_linear_head(
        embed,
        np.asarray(embed(t_train), dtype=np.float64),
        y_train,
        np.asarray(embed(t_val), dtype=np.float64),
        y_val,
        seed,
        name="minilm-finetuned+linear_head",
        family="transformer",
        kind="minilm_finetuned",
        encoder="all-MiniLM-L6-v2 (fine-tuned end to end)",
        write_encoder=lambda directory: shutil.copytree(folder, directory / "encoder"),
        max_tokens=max_tokens,
    )
    fitted.params.update({"epochs_trained": tuned.best_epoch, **cfg.as_dict()})
    fitted.extra_meta["fine_tuning"] = {
        "seed": seed,
        "deterministic": True,
        "device": device,
        "threads": threads,
        "max_tokens": max_tokens,
        "best_epoch": tuned.best_epoch,
        "precision_used": tuned.precision,
        "learning_curve": tuned.history,
        "seconds": tuned.seconds,
        "train_size": len(t_train),
        "head": "refitted after fine-tuning: class-balanced logistic regression on the "
        "fine-tuned embeddings, C chosen on validation log-loss",
        **cfg.as_dict(),
    }
    weakref.finalize(fitted, shutil.rmtree, folder, True)
    return fitted
