"""``mlserve load``: bring a model from disk into the store, safely.

Accepted inputs:

* a ``bentoml models export`` archive (``.bentomodel``, a tar), or a directory in the store's
  own layout (``model.yaml`` plus the model's files). Every file's sha256 must match the
  metadata, and nothing in it may need unpickling.
* a pickled scikit-learn text pipeline (``TfidfVectorizer`` then ``LogisticRegression`` or
  ``RandomForestClassifier``), only with ``trust_pickle``: it is unpickled here, once, by the
  user's explicit choice, converted to the safe classical layout (TF-IDF JSON + skops), and
  checked to give the same probabilities. The server never unpickles anything.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mlserve.errors import ModelIntegrityError, ValidationError
from mlserve.store import StoredModel, parse_tag, save_model, sha256_file, verify_files

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".sav", ".bin"}
_PROBES = [
    "This medicine worked wonders, I feel great.",
    "Terrible side effects, I had to stop after two days.",
    "It is okay. Some days are better than others.",
    "The government announced new economic policy today",
    "Football match ended in a dramatic draw",
]


def needs_unpickling(path: Path) -> bool:
    """A file that only ``pickle`` (or ``torch.load``/``joblib``) could read."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return True
    if zipfile.is_zipfile(path):  # torch.save writes a zip holding data.pkl
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith((".pkl", ".pickle")) for n in zf.namelist())
    return False


def import_model(
    source: Path, tag: str | None = None, *, trust_pickle: bool = False, overwrite: bool = False
) -> StoredModel:
    """Import ``source`` into the store (as ``tag``, or the tag it carries) and return it."""
    source = Path(source)
    if tag is not None:
        parse_tag(tag)
    if source.is_dir():
        return _import_directory(source, tag, trust_pickle, overwrite)
    if not source.is_file():
        raise ValidationError(f"{source} does not exist")
    if tarfile.is_tarfile(source):
        with tempfile.TemporaryDirectory(prefix="mlserve-import-") as tmp:
            try:
                with tarfile.open(source) as tar:
                    # The "data" filter refuses absolute paths, "..", links out and devices.
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as exc:
                raise ModelIntegrityError(f"refusing the archive {source.name}: {exc}") from exc
            return _import_directory(Path(tmp), tag, trust_pickle, overwrite)
    if needs_unpickling(source):
        if not trust_pickle:
            raise ModelIntegrityError(
                f"{source.name} is a pickle: loading it can run arbitrary code. Pass "
                "--trust-pickle only if you trust its origin; it is then converted to safe files"
            )
        if tag is None:
            raise ValidationError("give the converted model a tag (--tag name:version)")
        return convert_pickled_pipeline(source, tag, overwrite)
    raise ValidationError(
        f"{source.name} is neither a .bentomodel archive, a model directory nor a pickle"
    )


def _import_directory(
    directory: Path, tag: str | None, trust_pickle: bool, overwrite: bool
) -> StoredModel:
    import yaml

    info_path = directory / "model.yaml"
    if not info_path.is_file():
        raise ValidationError("not a model directory: model.yaml is missing")
    info = yaml.safe_load(info_path.read_text(encoding="utf-8")) or {}
    meta = dict(info.get("metadata") or {})
    pickles = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != "model.yaml" and needs_unpickling(p)
    )
    if pickles and not trust_pickle:
        raise ModelIntegrityError(
            f"refusing files that need unpickling: {', '.join(pickles)} (pass --trust-pickle "
            "if you trust their origin)"
        )
    if "runner_family" not in meta:
        if trust_pickle and len(pickles) == 1 and tag:
            return convert_pickled_pipeline(directory / pickles[0], tag, overwrite)
        raise ValidationError(
            "not an mlserve model (its metadata names no runner_family); a pickled scikit-learn "
            "pipeline can be converted with --trust-pickle --tag name:version"
        )
    original = f"{info.get('name')}:{info.get('version')}"
    verify_files(original, directory, meta)  # a tampered archive stops here
    target = tag or original
    parse_tag(target)
    meta["tag"] = target
    if target != original:
        meta["imported_as"] = {"from": original}

    def write(dest: Path) -> None:
        for path in directory.rglob("*"):
            rel = path.relative_to(directory)
            if path.is_file() and rel.as_posix() != "model.yaml":
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)

    return save_model(target, write, meta, overwrite=overwrite)


def convert_pickled_pipeline(path: Path, tag: str, overwrite: bool = False) -> StoredModel:
    """Unpickle a trusted scikit-learn text pipeline and store it in the safe classical layout."""
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from mlserve.calibration import Calibrator
    from mlserve.preprocessing import CleaningConfig
    from runners import load_runner
    from runners.classical import TfidfUnion, save_estimator

    obj = joblib.load(path)  # the user passed --trust-pickle for exactly this
    steps = obj.steps if isinstance(obj, Pipeline) else []
    vec = steps[0][1] if len(steps) == 2 else None
    clf = steps[-1][1] if steps else None
    kinds = {LogisticRegression: "logreg", RandomForestClassifier: "random_forest"}
    kind = kinds.get(type(clf))
    if type(vec) is not TfidfVectorizer or kind is None:
        raise ValidationError(
            "only a scikit-learn Pipeline of TfidfVectorizer then LogisticRegression or "
            "RandomForestClassifier can be converted"
        )
    params = vec.get_params()
    unsupported = {
        k: params[k]
        for k, default in (
            ("strip_accents", None),
            ("preprocessor", None),
            ("tokenizer", None),
            ("stop_words", None),
            ("norm", "l2"),
            ("use_idf", True),
            ("binary", False),
            ("input", "content"),
        )
        if params[k] != default
    }
    if unsupported or not isinstance(params["analyzer"], str):
        raise ValidationError(f"unsupported TfidfVectorizer settings: {sorted(unsupported)}")
    labels = [str(c) for c in clf.classes_]
    cleaning = CleaningConfig(
        unescape_html=False,
        unicode_nfkc=False,
        lowercase=bool(params["lowercase"]),
        strip_special=False,
        collapse_whitespace=False,
    )
    calibrator = Calibrator("isotonic", [{} for _ in labels])  # identity: keep its probabilities
    meta: dict[str, Any] = {
        "tag": tag,
        "runner_family": "classical",
        "labels": labels,
        "estimator": {"name": f"imported {type(clf).__name__}", "kind": kind, "params": {}},
        "hyperparameters": json.loads(json.dumps(clf.get_params(), default=str)),
        "metrics": {"test": {}},
        "calibration": {"method": "none (imported probabilities kept)"},
        "training_date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "preprocessing": {"cleaning": cleaning.model_dump(), "features": "tfidf"},
        "imported_from": {"file": path.name, "sha256": sha256_file(path), "format": "pickle"},
    }

    def write(directory: Path) -> None:
        TfidfUnion([vec]).save(directory / "tfidf.json")
        save_estimator(clf, kind, directory)
        (directory / "calibration.json").write_text(json.dumps(calibrator.to_dict()))

    stored = save_model(tag, write, meta, overwrite=overwrite)
    # The converted model must answer as the pickled one did.
    probes = _PROBES + [" ".join(list(vec.vocabulary_)[i : i + 5]) for i in range(0, 50, 5)]
    expected = obj.predict_proba(probes)
    got = load_runner(tag, warmup=False).predict(probes).probabilities
    diff = float(np.max(np.abs(expected - got)))
    if diff > 1e-4:
        import bentoml

        bentoml.models.delete(tag)
        raise ModelIntegrityError(f"the converted model differs from the pickle (max {diff:.2g})")
    return stored
