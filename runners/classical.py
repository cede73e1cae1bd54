"""Classical family: cleaning -> TF-IDF -> scikit-learn / XGBoost / LightGBM -> calibration.

Files (all safe to read): ``tfidf.json`` (parameters, vocabulary and idf of each vectorizer),
``calibration.json`` and
one estimator file: ``estimator.skops`` (loaded only with the trusted types below),
``estimator.ubj`` (XGBoost) or ``estimator.txt`` (LightGBM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlserve.calibration import Calibrator
from mlserve.errors import ModelIntegrityError
from mlserve.settings import get_settings
from runners.base import BatchResult, Runner, Stopwatch

ESTIMATOR_FILES = {
    "logreg": "estimator.skops",
    "random_forest": "estimator.skops",
    "xgboost": "estimator.ubj",
    "lightgbm": "estimator.txt",
}
# The only estimator types a skops file may contain, so a tampered file cannot name other
# classes or callables.
TRUSTED_SKOPS_TYPES = {
    "logreg": ["sklearn.linear_model._logistic.LogisticRegression"],
    "random_forest": [
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._tree.Tree",
    ],
}
# Plain containers and numbers a skops file of those estimators may hold besides them.
SKOPS_BASIC_TYPES = {
    f"builtins.{t}" for t in ("dict", "list", "tuple", "str", "int", "float", "bool", "NoneType")
} | {f"numpy.{t}" for t in ("ndarray", "int32", "int64", "float32", "float64", "dtype")}


def skops_types(path: Path) -> set[str]:
    """Every ``module.Class`` a skops file names, read from its schema without loading it.

    skops trusts many types by default (pipelines, numpy functions, ...); mlserve allows only
    the estimator's own types, so the whole schema is checked against an explicit list.
    """
    import zipfile

    with zipfile.ZipFile(path) as zf:
        schema = json.loads(zf.read("schema.json"))
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node:
                found.add(f"{node.get('__module__')}.{node['__class__']}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


TFIDF_PARAMS = (
    "analyzer",
    "ngram_range",
    "min_df",
    "max_df",
    "max_features",
    "sublinear_tf",
    "token_pattern",
)


class TfidfUnion:
    """Several TF-IDF vectorizers (e.g. word n-grams and character n-grams) side by side.

    Stored as JSON (parameters, vocabulary and idf of each), so loading never unpickles and
    reproduces the training features exactly.
    """

    def __init__(self, vectorizers: list[Any]):
        self.vectorizers = vectorizers

    @classmethod
    def from_params(cls, params: list[dict[str, Any]]) -> TfidfUnion:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return cls([TfidfVectorizer(lowercase=False, dtype=np.float32, **p) for p in params])

    def fit_transform(self, texts: list[str]) -> Any:
        import scipy.sparse as sp

        return sp.hstack([v.fit_transform(texts) for v in self.vectorizers], format="csr")

    def transform(self, texts: list[str]) -> Any:
        import scipy.sparse as sp

        return sp.hstack([v.transform(texts) for v in self.vectorizers], format="csr")

    def save(self, path: Path) -> None:
        parts = []
        for vec in self.vectorizers:
            params = {k: vec.get_params()[k] for k in TFIDF_PARAMS}
            vocab = {term: int(i) for term, i in vec.vocabulary_.items()}
            parts.append({"params": params, "vocabulary": vocab, "idf": vec.idf_.tolist()})
        path.write_text(json.dumps({"vectorizers": parts}), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TfidfUnion:
        from sklearn.feature_extraction.text import TfidfVectorizer

        data = json.loads(path.read_text(encoding="utf-8"))
        vecs = []
        for part in data["vectorizers"]:
            params = dict(part["params"])
            params["ngram_range"] = tuple(params["ngram_range"])
            vec = TfidfVectorizer(
                lowercase=False, dtype=np.float32, vocabulary=part["vocabulary"], **params
            )
            vec.idf_ = np.asarray(part["idf"], dtype=np.float64)
            vecs.append(vec)
        return cls(vecs)


def save_estimator(estimator: Any, kind: str, directory: Path) -> None:
    """Write a fitted estimator in its safe native format."""
    path = directory / ESTIMATOR_FILES[kind]
    if kind in TRUSTED_SKOPS_TYPES:
        import skops.io as sio

        sio.dump(estimator, path)
    elif kind == "xgboost":
        estimator.save_model(path)
    elif kind == "lightgbm":
        estimator.booster_.save_model(str(path))
    else:
        raise ValueError(f"unknown estimator kind {kind!r}")


def load_estimator(kind: str, directory: Path, n_threads: int = 1) -> Any:
    """Return a callable ``X -> raw probabilities (n, k)`` for the stored estimator."""
    if kind not in ESTIMATOR_FILES:
        raise ModelIntegrityError(f"unknown estimator kind {kind!r}")
    path = directory / ESTIMATOR_FILES[kind]
    if kind in TRUSTED_SKOPS_TYPES:
        import skops.io as sio

        allowed = set(TRUSTED_SKOPS_TYPES[kind]) | SKOPS_BASIC_TYPES
        untrusted = skops_types(path) - allowed
        if untrusted:
            raise ModelIntegrityError(f"estimator names untrusted types: {sorted(untrusted)}")
        est = sio.load(path, trusted=sorted(allowed))
        if hasattr(est, "n_jobs"):
            est.n_jobs = n_threads
        return est.predict_proba
    if kind == "xgboost":
        import xgboost as xgb

        clf = xgb.XGBClassifier(n_jobs=n_threads)
        clf.load_model(path)
        return clf.predict_proba
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(path))

    def lgb_proba(x: Any) -> np.ndarray:
        p = booster.predict(x, num_threads=n_threads)
        return np.column_stack([1 - p, p]) if p.ndim == 1 else p

    return lgb_proba


class ClassicalRunner(Runner):
    """Serves TF-IDF models with scikit-learn, XGBoost or LightGBM estimators."""

    family = "classical"
    # The TF-IDF analyzers are Python code: the batch thread holds the GIL while it computes.
    inline = True

    def load(self) -> None:
        meta, path = self.model.metadata, self.model.path
        self.vectorizer = TfidfUnion.load(path / "tfidf.json")
        self.proba = load_estimator(
            meta["estimator"]["kind"], path, n_threads=get_settings().blas_threads
        )
        cal = json.loads((path / "calibration.json").read_text(encoding="utf-8"))
        self.calibrator = Calibrator.from_dict(cal)
        self.loaded = True

    def infer(self, cleaned: list[str]) -> BatchResult:
        watch = Stopwatch()
        features = self.vectorizer.transform(cleaned)
        watch.lap("preprocess_ms")
        raw = self.proba(features)
        watch.lap("model_ms")
        probs = self.calibrator.transform(np.asarray(raw, dtype=np.float64))
        watch.lap("postprocess_ms")
        return BatchResult(self.labels, probs, self.calibrator.decide(probs), watch.timing)

    def close(self) -> None:
        self.vectorizer = self.proba = self.calibrator = None
        super().close()
