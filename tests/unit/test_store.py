"""mlserve.store: tag parsing, file hashing and integrity verification (no BentoML store used)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlserve.errors import ModelIntegrityError
from mlserve.store import hash_directory, parse_tag, sha256_file, verify_files

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("sentiment:v1", ("sentiment", "v1")),
        ("topic:20240101_1.2-rc", ("topic", "20240101_1.2-rc")),
        ("a:b", ("a", "b")),
    ],
)
def test_parse_tag_valid(tag: str, expected: tuple[str, str]) -> None:
    assert parse_tag(tag) == expected


@pytest.mark.parametrize(
    "tag",
    [
        "sentiment",
        "sentiment:",
        ":v1",
        "sentiment:v1:x",
        "Sentiment:v1",
        "../x:v1",
        "sentiment:../../etc",
        "/etc/passwd",
        "http://x",
        "%2e%2e:v1",
        "sentiment:v 1",
        " sentiment:v1",
        "",
        None,
        123,
        b"sentiment:v1",
    ],
)
def test_parse_tag_refuses(tag: object) -> None:
    with pytest.raises(ValueError, match="not a name:version tag"):
        parse_tag(tag)  # type: ignore[arg-type]


def test_parse_tag_refuses_trailing_newline() -> None:
    with pytest.raises(ValueError):
        parse_tag("sentiment:v1\n")


def test_sha256_file_small_and_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == EMPTY_SHA256
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert sha256_file(small) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_sha256_file_larger_than_one_chunk(tmp_path: Path) -> None:
    data = bytes(range(256)) * (10 * 1024 + 7)  # ~2.5 MiB: several 1 MiB chunks plus a tail
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty_folder").mkdir()
    (root / "weights.safetensors").write_bytes(b"\x00\x01weights")
    (root / "config.json").write_text('{"labels": ["neg", "pos"]}')
    (root / "sub" / "vocab.json").write_text('{"a": 0}')
    (root / "sub" / "deeper" / "model.yaml").write_text("a weight file that happens to be named so")
    (root / "model.yaml").write_text("name: sentiment\nversion: v1\n")  # BentoML's own
    return root


def test_hash_directory(model_dir: Path) -> None:
    hashes = hash_directory(model_dir)
    assert set(hashes) == {
        "config.json",
        "sub/deeper/model.yaml",
        "sub/vocab.json",
        "weights.safetensors",
    }
    assert "model.yaml" not in hashes  # BentoML writes it and rewrites it: not a model file
    assert hashes["weights.safetensors"] == hashlib.sha256(b"\x00\x01weights").hexdigest()
    assert hashes["sub/vocab.json"] == sha256_file(model_dir / "sub" / "vocab.json")
    assert list(hashes) == sorted(hashes)


def test_hash_directory_ignores_changes_to_model_yaml(model_dir: Path) -> None:
    before = hash_directory(model_dir)
    (model_dir / "model.yaml").write_text("name: sentiment\nversion: v1\nlabels: {}\n")
    assert hash_directory(model_dir) == before


def test_hash_directory_of_empty_folder(tmp_path: Path) -> None:
    assert hash_directory(tmp_path) == {}


def test_verify_files_passes_for_untouched_model(model_dir: Path) -> None:
    metadata = {"labels": ["neg", "pos"], "files": hash_directory(model_dir)}
    assert verify_files("sentiment:v1", model_dir, metadata) is None
    # BentoML rewriting model.yaml is not tampering.
    (model_dir / "model.yaml").write_text("changed by bentoml")
    verify_files("sentiment:v1", model_dir, metadata)


def test_verify_files_names_changed_file(model_dir: Path) -> None:
    metadata = {"files": hash_directory(model_dir)}
    (model_dir / "weights.safetensors").write_bytes(b"\x00\x01weightz")
    with pytest.raises(ModelIntegrityError) as info:
        verify_files("sentiment:v1", model_dir, metadata)
    msg = info.value.message
    assert msg.startswith("sentiment:v1 failed verification")
    assert "checksum mismatch: weights.safetensors" in msg
    assert "missing" not in msg
    assert "unexpected" not in msg
    assert info.value.status == 422


def test_verify_files_names_missing_file(model_dir: Path) -> None:
    metadata = {"files": hash_directory(model_dir)}
    (model_dir / "sub" / "vocab.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"missing: sub/vocab\.json\)"):
        verify_files("sentiment:v1", model_dir, metadata)


def test_verify_files_names_unexpected_file(model_dir: Path) -> None:
    metadata = {"files": hash_directory(model_dir)}
    (model_dir / "sub" / "payload.pkl").write_bytes(b"\x80\x04evil")
    with pytest.raises(ModelIntegrityError, match=r"unexpected: sub/payload\.pkl\)"):
        verify_files("sentiment:v1", model_dir, metadata)


def test_verify_files_reports_every_problem(model_dir: Path) -> None:
    metadata = {"files": hash_directory(model_dir)}
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sub" / "deeper" / "model.yaml").write_text("tampered")
    (model_dir / "weights.safetensors").unlink()
    (model_dir / "extra.bin").write_bytes(b"x")
    with pytest.raises(ModelIntegrityError) as info:
        verify_files("topic:v2", model_dir, metadata)
    assert info.value.message == (
        "topic:v2 failed verification (checksum mismatch: config.json, sub/deeper/model.yaml; "
        "missing: weights.safetensors; unexpected: extra.bin)"
    )


@pytest.mark.parametrize("files", [None, {}, [], "abc"], ids=["none", "empty", "list", "str"])
def test_verify_files_refuses_model_without_checksums(model_dir: Path, files: object) -> None:
    metadata = {} if files is None else {"files": files}
    with pytest.raises(ModelIntegrityError, match="records no file checksums"):
        verify_files("sentiment:v1", model_dir, metadata)
