"""`mlserve load`'s importer: archives and directories verified, pickles refused or converted."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import bentoml
import joblib
import numpy as np
import pytest
import yaml
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from mlserve.errors import ModelIntegrityError, ValidationError
from mlserve.importer import import_model, needs_unpickling
from mlserve.store import hash_directory, model_exists
from runners import load_runner
from tests.unit.test_runners import tiny_dataset
from training.pipeline import TrainConfig, save_result, train

PROBES = ["the goalkeeper saved the game", "fresh bread and butter", "a faster chip"]


@pytest.fixture(scope="module")
def source_tag() -> str:
    run = train(tiny_dataset(), TrainConfig(candidates=("logreg",)))
    save_result(run, run.results[0], "imp-src:v1", "unit test", overwrite=True)
    return "imp-src:v1"


@pytest.fixture
def archive(source_tag, tmp_path) -> Path:
    path = tmp_path / "imp-src-v1.bentomodel"
    bentoml.models.export_model(source_tag, str(path))
    return path


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def repack(directory: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(directory.rglob("*")):
            tar.add(item, arcname=item.relative_to(directory).as_posix(), recursive=False)
    return path


def rehash(directory: Path) -> None:
    info = yaml.safe_load((directory / "model.yaml").read_text())
    info["metadata"]["files"] = hash_directory(directory)
    (directory / "model.yaml").write_text(yaml.safe_dump(info))


def test_an_exported_archive_imports_under_a_new_tag(source_tag, archive) -> None:
    stored = import_model(archive, "imp-copy:v1")
    assert stored.tag == "imp-copy:v1" and stored.metadata["imported_as"]["from"] == source_tag
    a = load_runner(source_tag, warmup=False).predict(PROBES).probabilities
    b = load_runner("imp-copy:v1", warmup=False).predict(PROBES).probabilities
    np.testing.assert_array_equal(a, b)


def test_a_model_directory_imports(source_tag, archive, tmp_path) -> None:
    directory = unpack(archive, tmp_path / "dir")
    assert import_model(directory, "imp-dir:v1").tag == "imp-dir:v1"


def test_a_tampered_archive_is_refused_and_not_stored(archive, tmp_path) -> None:
    directory = unpack(archive, tmp_path / "x")
    (directory / "calibration.json").write_text('{"method": "sigmoid", "params": []}')
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        import_model(repack(directory, tmp_path / "bad.bentomodel"), "imp-bad:v1")
    assert not model_exists("imp-bad:v1")


def test_an_archive_escaping_its_folder_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.bentomodel"
    with tarfile.open(path, "w:gz") as tar:
        data = b"owned"
        member = tarfile.TarInfo("../../evil.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ModelIntegrityError, match="refusing the archive"):
        import_model(path, "imp-evil:v1")
    assert not (tmp_path.parent / "evil.txt").exists()


def test_pickled_files_in_a_model_need_trust(archive, tmp_path) -> None:
    directory = unpack(archive, tmp_path / "p")
    (directory / "extra.bin").write_bytes(pickle.dumps({"x": 1}))
    rehash(directory)  # checksums in order: only the pickle is in question
    with pytest.raises(ModelIntegrityError, match=r"need unpickling: extra\.bin"):
        import_model(directory, "imp-pkl:v1")
    assert not model_exists("imp-pkl:v1")
    assert import_model(directory, "imp-pkl:v1", trust_pickle=True).tag == "imp-pkl:v1"


def fitted_pipeline(**vectorizer):
    ds = tiny_dataset()
    pipe = make_pipeline(TfidfVectorizer(**vectorizer), LogisticRegression(max_iter=500))
    return pipe.fit(ds.texts, ds.labels)


def test_a_pickled_pipeline_is_refused_without_trust(tmp_path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(fitted_pipeline(), path)
    with pytest.raises(ModelIntegrityError, match="--trust-pickle"):
        import_model(path, "imp-conv:v1")
    assert not model_exists("imp-conv:v1")


def test_a_trusted_pickled_pipeline_is_converted_to_safe_files(tmp_path) -> None:
    pipe = fitted_pipeline(ngram_range=(1, 2), sublinear_tf=True)
    path = tmp_path / "model.pkl"
    joblib.dump(pipe, path)
    stored = import_model(path, "imp-conv:v1", trust_pickle=True)
    files = [p for p in stored.path.rglob("*") if p.is_file()]
    assert files and not any(needs_unpickling(p) for p in files)
    got = load_runner("imp-conv:v1", warmup=False).predict(PROBES)
    np.testing.assert_allclose(got.probabilities, pipe.predict_proba(PROBES), atol=1e-5)
    assert got.labels == list(pipe.classes_)
    assert stored.metadata["imported_from"]["format"] == "pickle"


def test_unsupported_pipelines_are_not_converted(tmp_path) -> None:
    path = tmp_path / "model.pkl"
    joblib.dump(fitted_pipeline(stop_words="english"), path)
    with pytest.raises(ValidationError, match="stop_words"):
        import_model(path, "imp-conv2:v1", trust_pickle=True)
    assert not model_exists("imp-conv2:v1")


def test_other_files_are_refused(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValidationError, match="neither"):
        import_model(path, "imp-x:v1")
    shutil.rmtree(tmp_path)
    with pytest.raises(ValidationError, match="does not exist"):
        import_model(path, "imp-x:v1")


def test_store_tool_exports_and_imports_with_relative_paths(
    source_tag, tmp_path, monkeypatch, capsys
) -> None:
    """bentoml resolves a relative export or import path against `/`: `store_tool export out/`
    from a project folder must write there, and `import out/x.bentomodel` read from there."""
    from model_store_scripts import store_tool

    monkeypatch.chdir(tmp_path)
    assert store_tool.main(["export", "out", source_tag]) == 0
    archive = Path("out") / f"{source_tag.replace(':', '-')}.bentomodel"
    assert (tmp_path / archive).is_file()
    bentoml.models.delete(source_tag)
    assert store_tool.main(["import", str(archive)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    assert model_exists(source_tag)
