"""A cross-validated learning curve: how a candidate's macro-F1 grows with its training data.

``python -m training.learning_curve drugscom logreg`` trains the candidate with the pipeline's
cross-validation protocol (:data:`training.pipeline.CV_PROTOCOL`, same folds of train+validation,
the test split untouched) on growing stratified shares of each fold's training part, and prints
the mean ± std of the held-out macro-F1 (and PR-AUC, ECE) per share, as JSON. A curve still
rising at 100 % says more data would help; a flat one, that the model has what the data gives.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from mlserve.preprocessing import clean_texts
from training.data import Dataset
from training.pipeline import TrainConfig, _cv_folds, _Fitter, _split, cross_validate

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def learning_curve(
    dataset: Dataset,
    kind: str,
    cfg: TrainConfig | None = None,
    fractions: tuple[float, ...] = FRACTIONS,
) -> list[dict[str, Any]]:
    """One point per share of the training data: its size and the cross-validated metrics."""
    cfg = cfg or TrainConfig(candidates=(kind,))
    labels = dataset.validate().classes
    y_all = np.array([labels.index(label) for label in dataset.labels])
    train_idx, val_idx, _ = _split(dataset, cfg)
    rest = train_idx + val_idx
    cleaned = clean_texts(dataset.texts, cfg.cleaning)
    texts, y = [cleaned[i] for i in rest], y_all[rest]
    folds = _cv_folds(y, cfg)
    fitter = _Fitter(cfg, len(labels))
    points = []
    for fraction in fractions:
        cv = cross_validate(fitter, kind, texts, y, folds, labels, cfg, fraction=fraction)
        fit_size = round(float(np.mean([len(f) for f, _ in folds])) * fraction)
        points.append(
            {
                "fraction": fraction,
                "fit_examples": fit_size,
                **{m: cv[m] for m in ("f1_macro", "pr_auc", "ece")},
            }
        )
    return points


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a thin command line
    from training.data import load_named

    args = argv if argv is not None else sys.argv[1:]
    data, kind = (args + ["drugscom", "logreg"][len(args) :])[:2]
    print(json.dumps(learning_curve(load_named(data), kind), indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
