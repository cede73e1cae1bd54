"""mlserve.image: backend choice, the generated bentofiles, the torch wheel and image sizes
(no image is built here; tests/integration/test_image.py builds and runs one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from mlserve import image


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_committed_bentofiles_keep_the_default_base_for_docker() -> None:
    for variant, name in image.BENTOFILES.items():
        data = load(image.REPO / name)
        docker = data["docker"]
        assert "base_image" not in docker, variant  # BentoML's python:3.11-slim
        assert docker["dockerfile_template"] == "deploy/image/Dockerfile.j2"
        assert (image.REPO / docker["dockerfile_template"]).is_file()
        assert "libgomp1" in docker["system_packages"]


def test_slim_bentofile_has_no_torch_and_only_classical_models() -> None:
    data = load(image.REPO / "bentofile.slim.yaml")
    packages = " ".join(data["python"]["packages"])
    for heavy in ("torch", "transformers", "minilm", "sentence-transformers"):
        assert heavy not in packages
    assert data["models"] == ["sentiment:v1", "topic:v1"]
    envs = {e["name"]: e["value"] for e in data["envs"]}
    assert envs["MLSERVE_MODELS"] == "sentiment:v1,topic:v1"
    assert "runners/transformer.py" in data["exclude"]
    # Everything else in step with the full bentofile.
    full = load(image.REPO / "bentofile.yaml")
    assert data["docker"] == full["docker"]
    assert set(data["python"]["packages"]) < set(full["python"]["packages"])


def test_full_bentofile_takes_torch_cpu_from_the_cpu_index() -> None:
    python = load(image.REPO / "bentofile.yaml")["python"]
    assert "torch==2.13.0+cpu" in python["packages"]
    assert python["extra_index_url"] == ["https://download.pytorch.org/whl/cpu"]
    assert image.torch_pin("full") == "2.13.0"
    assert image.torch_pin("slim") is None


def test_generated_bentofile_swaps_in_the_base_and_the_wheel(tmp_path: Path) -> None:
    wheel = image.REPO / "build" / "wheels" / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
    path = image.write_bentofile("full", tmp_path, "localhost/base:1", wheel)
    data = load(path)
    assert data["docker"]["base_image"] == "localhost/base:1"
    for key in ("distro", "python_version", "system_packages"):
        assert key not in data["docker"]
    assert data["docker"]["dockerfile_template"] == "deploy/image/Dockerfile.j2"
    packages = data["python"]["packages"]
    assert not [p for p in packages if p.startswith("torch==")]
    assert f"./wheels/{wheel.name}" in packages
    assert data["python"]["wheels"] == [f"build/wheels/{wheel.name}"]
    assert "extra_index_url" not in data["python"] and "pip_args" not in data["python"]
    # Docker: nothing swapped.
    same = load(image.write_bentofile("slim", tmp_path, None, None))
    assert same == load(image.REPO / "bentofile.slim.yaml")


def test_find_torch_wheel_in_pip_find_links(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    (tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")  # CUDA
    monkeypatch.setenv("PIP_FIND_LINKS", f"/nowhere {tmp_path}")
    assert image.find_torch_wheel("2.13.0") == wheel.resolve()
    assert image.find_torch_wheel("2.12.0") is None
    with pytest.raises(image.ImageError):
        image.find_torch_wheel("2.13.0", tmp_path / "missing.whl")


def test_docker_client_without_an_engine_means_buildah(monkeypatch) -> None:
    which = {"docker": "/usr/bin/docker", "buildah": "/usr/bin/buildah"}
    monkeypatch.setattr(image.shutil, "which", lambda name: which.get(name))

    def no_engine(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, b"", b"Cannot connect to the Docker daemon")

    monkeypatch.setattr(image.subprocess, "run", no_engine)
    assert image.pick_backend("auto") == "buildah"
    with pytest.raises(image.ImageError, match="no Docker engine"):
        image.pick_backend("docker")
    monkeypatch.setattr(
        image.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0)
    )
    assert image.pick_backend("auto") == "docker"
    del which["buildah"]
    monkeypatch.setattr(image.subprocess, "run", no_engine)
    with pytest.raises(image.ImageError, match="neither"):
        image.pick_backend("auto")


def test_buildah_env_uses_a_vfs_store_and_drops_host_pip_settings(tmp_path: Path) -> None:
    base = {"PIP_FIND_LINKS": "/opt/wheels", "PIP_CERT": "/x.crt", "PATH": "/usr/bin"}
    env = image.buildah_env(tmp_path / "store", base=base)
    assert "PIP_FIND_LINKS" not in env and "PIP_CERT" not in env
    assert env["BUILDAH_ISOLATION"] == "chroot"
    assert env["BUILDAH_FORMAT"] == "docker"  # OCI drops HEALTHCHECK
    conf = Path(env["CONTAINERS_STORAGE_CONF"]).read_text()
    assert 'driver = "vfs"' in conf and str(tmp_path / "store") in conf
    # A storage configuration the user set is kept.
    kept = image.buildah_env(None, base={"CONTAINERS_STORAGE_CONF": "/etc/mine.conf"})
    assert kept["CONTAINERS_STORAGE_CONF"] == "/etc/mine.conf"


@pytest.mark.parametrize(
    ("shown", "size"), [("634 MB", 634_000_000), ("1.95 GB", 1_950_000_000), (1234, 1234)]
)
def test_image_size_from_buildah(monkeypatch, shown, size) -> None:
    import json

    out = json.dumps([{"names": ["x"], "size": shown}])
    monkeypatch.setattr(
        image.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, out)
    )
    assert image.image_size("buildah", "x", {}) == size
    assert image.human(size).split()[1] in ("KB", "MB", "GB")


def test_both_bentofiles_install_every_runtime_dependency() -> None:
    """pyproject's `dependencies` are what the service imports; a bento that lacks one builds
    an image that cannot start."""
    import tomllib

    deps = tomllib.loads((image.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("bentofile.yaml", "bentofile.slim.yaml"):
        packages = set(load(image.REPO / name)["python"]["packages"])
        assert set(deps) <= packages, (name, sorted(set(deps) - packages))
