"""``mlserve containerize``: bento -> container image, with Docker or, without it, buildah.

* **Variants.** ``slim`` (``bentofile.slim.yaml``: classical runner, sentiment:v1 and topic:v1, no
  torch) and ``full`` (``bentofile.yaml``: the transformer too, with torch's CPU build).
* **Backend.** Docker when its engine answers (``docker info``), else buildah.
* **Base image.** Docker keeps the bentofiles' default (python:3.11-slim). buildah needs no
  registry: a base made from Debian packages (``deploy/image/build-base-image.sh``: debootstrap
  bookworm minbase with python3 3.11, ``buildah import``), built once and cached, is set as
  ``docker.base_image`` in a copy of the bentofile; the committed bentofiles are not changed.
* **torch.** The full bentofile takes ``torch==2.13.0+cpu`` from PyTorch's CPU index. Where that
  index is out of reach, a local CPU wheel (``--torch-wheel``, or found in ``PIP_FIND_LINKS``)
  is packed into the bento and installed from there.
* **Storage.** buildah keeps its images in ``~/.cache/mlserve/containers`` (vfs driver, works
  without fuse-overlayfs or user namespaces) unless ``CONTAINERS_STORAGE_CONF`` is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BENTOFILES = {"slim": "bentofile.slim.yaml", "full": "bentofile.yaml"}
LOCAL_BASE_IMAGE = "localhost/mlserve-base:bookworm"
BASE_SCRIPT = REPO / "deploy" / "image" / "build-base-image.sh"
TORCH_RE = re.compile(r"^torch\s*==\s*([0-9][^+\s;]*)")
# The machine's pip settings name host paths a build cannot see.
HOST_ONLY_ENV = ("PIP_FIND_LINKS", "PIP_CERT")


class ImageError(Exception):
    pass


def default_storage_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlserve" / "containers"


def docker_available() -> bool:
    """True when a Docker engine answers, not merely when the client is installed."""
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def pick_backend(requested: str = "auto") -> str:
    if requested not in ("auto", "docker", "buildah"):
        raise ImageError(f"unknown backend {requested!r}: use auto, docker or buildah")
    if requested in ("auto", "docker") and docker_available():
        return "docker"
    if requested == "docker":
        raise ImageError("no Docker engine answers `docker info`")
    if shutil.which("buildah") is None:
        raise ImageError(
            "neither a Docker engine nor buildah is available: install one "
            "(Debian: apt-get install buildah debootstrap)"
        )
    return "buildah"


def buildah_env(storage_dir: Path | None = None, base: dict[str, str] | None = None) -> dict:
    """The environment for buildah (and `bentoml containerize --backend buildah`): chroot
    isolation, docker image format (keeps HEALTHCHECK), and a vfs store unless one is set."""
    env = dict(os.environ if base is None else base)
    for key in HOST_ONLY_ENV:
        env.pop(key, None)
    env.update(BUILDAH_ISOLATION="chroot", BUILDAH_FORMAT="docker", BENTOML_DO_NOT_TRACK="true")
    if storage_dir is not None or "CONTAINERS_STORAGE_CONF" not in env:
        storage = Path(storage_dir or default_storage_dir()).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        conf = storage / "storage.conf"
        text = (
            "[storage]\n"
            'driver = "vfs"\n'
            f'runroot = "{storage / "run"}"\n'
            f'graphroot = "{storage / "storage"}"\n'
        )
        if not conf.is_file() or conf.read_text() != text:
            conf.write_text(text)
        env["CONTAINERS_STORAGE_CONF"] = str(conf)
    return env


def find_torch_wheel(version: str, explicit: Path | None = None) -> Path | None:
    """A local torch CPU wheel for ``version``: ``explicit``, else one in PIP_FIND_LINKS."""
    if explicit is not None:
        if not explicit.is_file():
            raise ImageError(f"torch wheel {explicit} not found")
        return explicit.resolve()
    for entry in os.environ.get("PIP_FIND_LINKS", "").split():
        folder = Path(entry.removeprefix("file://"))
        if folder.is_dir():
            wheels = sorted(folder.glob(f"torch-{version}+cpu-cp311-*linux*_x86_64.whl"))
            if wheels:
                return wheels[-1].resolve()
    return None


def stage_wheel(wheel: Path) -> Path:
    """The wheel under ``build/wheels`` in the project: `bentoml build` only packs wheels given
    by a relative path inside the build context."""
    folder = REPO / "build" / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / wheel.name
    if wheel.resolve() == staged.resolve():
        return staged
    if not staged.is_file() or staged.stat().st_size != wheel.stat().st_size:
        staged.unlink(missing_ok=True)
        try:
            os.link(wheel, staged)  # same file system: no copy
        except OSError:
            shutil.copy2(wheel, staged)
    return staged


def write_bentofile(
    variant: str, out_dir: Path, base_image: str | None, torch_wheel: Path | None
) -> Path:
    """A copy of the variant's bentofile with the local base image and torch wheel swapped in."""
    data = yaml.safe_load((REPO / BENTOFILES[variant]).read_text())
    docker = data.setdefault("docker", {})
    if base_image:
        docker["base_image"] = base_image
        # Ignored with a base image (BentoML warns); the local base has libgomp1 and python 3.11.
        for key in ("distro", "python_version", "system_packages"):
            docker.pop(key, None)
    python = data.setdefault("python", {})
    if torch_wheel is not None:
        packages = [p for p in python.get("packages", []) if not TORCH_RE.match(p)]
        # A path, so the resolver takes this wheel and never looks torch up on an index.
        python["packages"] = [*packages, f"./wheels/{torch_wheel.name}"]
        python["wheels"] = [torch_wheel.relative_to(REPO).as_posix()]
        for key in ("extra_index_url", "pip_args"):
            python.pop(key, None)
    path = out_dir / f"bentofile.{variant}.generated.yaml"
    path.write_text(
        f"# Generated by `mlserve containerize` from {BENTOFILES[variant]}.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def torch_pin(variant: str) -> str | None:
    data = yaml.safe_load((REPO / BENTOFILES[variant]).read_text())
    for package in data.get("python", {}).get("packages", []):
        if m := TORCH_RE.match(package):
            return m.group(1)
    return None


def image_exists(image: str, env: dict[str, str]) -> bool:
    cmd = ["buildah", "inspect", "--type", "image", image]
    return subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0


def image_size(backend: str, image: str, env: dict[str, str]) -> int:
    """The image's size in bytes (its layers, uncompressed)."""
    if backend == "docker":
        out = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Size}}", image],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())
    out = subprocess.run(
        ["buildah", "images", "--json", image], env=env, capture_output=True, text=True, check=True
    ).stdout
    size = json.loads(out)[0]["size"]
    if isinstance(size, int | float):
        return int(size)
    # buildah 1.28 (Debian bookworm) prints it for humans: "634 MB" (powers of 1000).
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKMGT]?B)\s*", str(size))
    if not m:
        raise ImageError(f"cannot read the image size {size!r}")
    scale = {"B": 0, "kB": 1, "KB": 1, "MB": 2, "GB": 3, "TB": 4}[m.group(2)]
    return int(float(m.group(1)) * 1000**scale)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"  # pragma: no cover


@dataclass
class Result:
    image: str
    backend: str
    bento: str
    size: int
    seconds: dict[str, float]


def _stream(
    cmd: Sequence[str], env: dict[str, str], echo: Callable[[str], None], cwd: Path = REPO
) -> list[str]:
    """Run ``cmd``, echoing each output line; return the lines; raise on failure."""
    lines: list[str] = []
    with subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            echo(line)
    if proc.returncode != 0:
        tail = "\n".join(lines[-30:])
        raise ImageError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{tail}")
    return lines


def containerize(
    variant: str = "slim",
    backend: str = "auto",
    image: str | None = None,
    base_image: str | None = None,
    torch_wheel: Path | None = None,
    storage_dir: Path | None = None,
    step: Callable[[str], None] = print,
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Result:
    """Build the bento and its image; see the module docstring."""
    if variant not in BENTOFILES:
        raise ImageError(f"unknown variant {variant!r}: use slim or full")
    seconds: dict[str, float] = {}
    backend = pick_backend(backend)
    step(f"backend: {backend}")
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    if backend == "buildah":
        env = buildah_env(storage_dir)
        step(f"image storage: {env['CONTAINERS_STORAGE_CONF']}")
        base = base_image or LOCAL_BASE_IMAGE
        if base_image is None or base == LOCAL_BASE_IMAGE:
            if image_exists(base, env):
                step(f"base image {base}: cached")
            else:
                step(f"building the base image {base} from Debian packages (once, cached)")
                start = time.monotonic()
                _stream(["bash", str(BASE_SCRIPT), base], env, echo)
                seconds["base image"] = time.monotonic() - start
        image = image or f"localhost/mlserve:{variant}"
    else:
        env = {k: v for k, v in os.environ.items() if k not in HOST_ONLY_ENV}
        env["BENTOML_DO_NOT_TRACK"] = "true"
        base = base_image  # None keeps the bentofile's default base (python:3.11-slim)
        image = image or f"mlserve:{variant}"

    wheel = None
    version = torch_pin(variant)
    if version is not None:
        wheel = find_torch_wheel(version, torch_wheel)
        if wheel is not None:
            step(f"torch: the local CPU wheel {wheel.name} goes into the bento")
        elif backend == "buildah":
            step("torch: no local CPU wheel; the build needs download.pytorch.org/whl/cpu")
        else:
            step("torch: the CPU build, from download.pytorch.org/whl/cpu")

    if wheel is not None:
        wheel = stage_wheel(wheel)
    with tempfile.TemporaryDirectory(prefix="mlserve-containerize-") as tmp:
        bentofile = write_bentofile(variant, Path(tmp), base, wheel)
        step(f"bentoml build ({BENTOFILES[variant]}{', base ' + base if base else ''})")
        start = time.monotonic()
        out = _stream(
            [bentoml, "build", "-f", str(bentofile), "--output", "tag", str(REPO)], env, echo
        )
        seconds["bento"] = time.monotonic() - start
    tags = [line.removeprefix("__tag__:") for line in out if line.startswith("__tag__:")]
    if not tags:
        raise ImageError("bentoml build printed no tag:\n" + "\n".join(out[-20:]))
    bento = tags[-1]
    step(f"bento {bento}; bentoml containerize --backend {backend} -t {image}")
    start = time.monotonic()
    # From the temporary folder: BentoML 1.4.39 copies the bento there and then refuses our
    # dockerfile_template for lying outside the working directory (bentoml/BentoML#5566).
    cmd = [bentoml, "containerize", bento, "--backend", backend, "-t", image]
    _stream(cmd, env, echo, cwd=Path(tempfile.gettempdir()))
    seconds["image"] = time.monotonic() - start
    return Result(image, backend, bento, image_size(backend, image, env), seconds)
