"""The BentoML model store, used safely.

Every file a model writes is listed with its sha256 in the model's metadata (``files``), and
:func:`open_model` refuses a model whose files do not match: a missing, altered or extra file.
Nothing here unpickles: model files are JSON, skops (with explicit trusted types), XGBoost UBJ,
LightGBM text or safetensors, and each family's runner module reads its own files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.errors import (
    InvalidTagError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelStoreError,
)
from mlserve.settings import TAG_RE

# Files BentoML itself writes into every model directory; they are not model weights.
_BENTOML_FILES = {"model.yaml"}
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_directory(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` for every file under ``root`` except BentoML's own."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in _BENTOML_FILES:
            out[rel] = sha256_file(path)
    return out


def parse_tag(tag: object) -> tuple[str, str]:
    """Split ``name:version``; anything else raises :class:`InvalidTagError` (a 422, and a
    ``ValueError``): no paths, URLs, encoded escapes or other types."""
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise InvalidTagError(
            f"not a name:version tag of safe characters: {str(tag)[:80]!r}; a model is named by "
            "its store tag, of lowercase letters, digits, '_', '-' and '.'; paths, URLs and "
            "uploads are not accepted"
        )
    name, version = tag.split(":", 1)
    return name, version


@dataclass(frozen=True)
class StoredModel:
    """A verified model from the store."""

    tag: str
    name: str
    version: str
    path: Path
    metadata: dict[str, Any]
    creation_time: str

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def family(self) -> str:
        return str(self.metadata["runner_family"])


def model_exists(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True


def save_model(
    tag: str,
    write_files: Callable[[Path], None],
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
) -> StoredModel:
    """Create ``tag`` in the store: ``write_files(dir)`` writes the files, then all are hashed.

    An existing tag is an error unless ``overwrite`` is set, in which case it is deleted first.
    """
    import bentoml

    parse_tag(tag)
    if model_exists(tag):
        if not overwrite:
            raise ModelStoreError(f"{tag} already exists in the store; pass --overwrite to replace")
        bentoml.models.delete(tag)
    with bentoml.models.create(tag, labels={"app": "mlserve"}, metadata={}) as model:
        path = Path(model.path)
        write_files(path)
        files = hash_directory(path)
        # The metadata round-trips through YAML: keep it to JSON types, without nulls
        # (BentoML refuses None values).
        model.info.metadata.update(_drop_none(json.loads(json.dumps({**metadata, "files": files}))))
    try:
        return open_model(tag)
    except Exception:
        # Never leave a model that cannot be read back in the store.
        with contextlib.suppress(Exception):
            bentoml.models.delete(tag)
        raise


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


def open_model(tag: str, *, verify: bool = True) -> StoredModel:
    """Look up ``tag`` and (by default) verify every file's sha256 against its metadata."""
    import bentoml
    from bentoml.exceptions import NotFound

    name, version = parse_tag(tag)
    try:
        model = bentoml.models.get(tag)
    except NotFound as exc:
        raise ModelNotFoundError(f"model {tag} is not in the store") from exc
    path = Path(model.path)
    metadata = dict(model.info.metadata)
    if verify:
        verify_files(tag, path, metadata)
    return StoredModel(
        tag=f"{name}:{version}",
        name=name,
        version=version,
        path=path,
        metadata=metadata,
        creation_time=model.info.creation_time.isoformat(),
    )


def verify_files(tag: str, path: Path, metadata: dict[str, Any]) -> None:
    """Raise :class:`ModelIntegrityError` unless the files on disk are exactly those recorded."""
    expected = metadata.get("files")
    if not isinstance(expected, dict) or not expected:
        raise ModelIntegrityError(f"{tag} records no file checksums; refusing to load it")
    actual = hash_directory(path)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(f for f in expected if f in actual and actual[f] != expected[f])
    if missing or extra or changed:
        parts = []
        if changed:
            parts.append(f"checksum mismatch: {', '.join(changed)}")
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected: {', '.join(extra)}")
        raise ModelIntegrityError(f"{tag} failed verification ({'; '.join(parts)})")


def list_models(name: str | None = None) -> list[StoredModel]:
    """Every mlserve model in the store (unverified; for listings), newest first."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # no model of that name yet
        return []
    out = []
    for model in models:
        meta = dict(model.info.metadata)
        if "runner_family" not in meta:
            continue
        out.append(
            StoredModel(
                tag=str(model.tag),
                name=model.tag.name,
                version=str(model.tag.version),
                path=Path(model.path),
                metadata=meta,
                creation_time=model.info.creation_time.isoformat(),
            )
        )
    return sorted(out, key=lambda m: m.creation_time, reverse=True)


def bentoml_home() -> Path:
    """Where the store lives (``BENTOML_HOME`` or BentoML's default)."""
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
