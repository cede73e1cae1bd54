"""Fixtures shared by the unit and integration suites."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# BentoML resolves its model store once per process, from BENTOML_HOME. Point it at a
# throw-away folder before anything touches it, so no test can write to the user's store.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="mlserve-tests-bentoml-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mlserve.settings import get_settings


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated process environment for one test.

    * every ``MLSERVE_*`` variable from the caller's shell is removed;
    * the working directory is an empty temporary folder, so no stray ``.env`` is read;
    * ``BENTOML_HOME`` and ``MLSERVE_DATA_DIR`` point into that folder, so nothing touches the
      user's model store or data cache;
    * the cached :func:`mlserve.settings.get_settings` is cleared before and after.

    Yields the temporary working directory.
    """
    for key in list(os.environ):
        if key.startswith("MLSERVE_"):
            monkeypatch.delenv(key)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("MLSERVE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield workdir
    get_settings.cache_clear()
