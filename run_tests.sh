#!/usr/bin/env bash
# Install everything the tests need and run the whole suite (lint, unit, integration).
#   ./run_tests.sh                 everything
#   ./run_tests.sh tests/unit -x   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/install.sh
source scripts/install.sh
install_mlserve "train,torch,dev,load"
export HF_HUB_OFFLINE=1

# A real Redis for the cache tests: use one on 127.0.0.1:6379, or start one if we can.
if ! .venv/bin/python -c "import redis; redis.Redis(socket_timeout=1).ping()" 2>/dev/null; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "==> starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 1 50); do
      .venv/bin/python -c "import redis; redis.Redis(socket_timeout=1).ping()" 2>/dev/null && break
      sleep 0.1
    done
  elif [ "${CI:-}" = "true" ]; then
    echo "error: no Redis at 127.0.0.1:6379 and no redis-server binary; CI needs one" >&2
    exit 1
  fi
fi

# deploy/ checks: promtool (Prometheus config, alert rules and their unit tests) and kustomize
# (`kubectl kustomize`) render the manifests; the topology test
# (tests/integration/test_topology.py) runs prometheus and haproxy for real. Install what is
# missing when we can (root + apt).
need_pkgs=()
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v haproxy >/dev/null 2>&1 || need_pkgs+=(haproxy)
# tests/integration/test_overload.py floods the server with hey.
command -v hey >/dev/null 2>&1 || need_pkgs+=(hey)
if ! command -v kustomize >/dev/null 2>&1 && ! command -v kubectl >/dev/null 2>&1; then
  # Needs a Kubernetes apt repository: Debian's own kubectl (kubernetes-client 1.20) bundles a
  # kustomize too old for these manifests.
  need_pkgs+=(kubectl)
fi
# tests/integration/test_image.py builds and runs the container image without Docker: buildah,
# and debootstrap for its base image (skipped without them, except under CI=true).
command -v buildah >/dev/null 2>&1 || need_pkgs+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> apt-get install ${need_pkgs[*]}"
    apt-get update -qq || true
    for pkg in "${need_pkgs[@]}"; do
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
        >/dev/null || echo "warning: could not install $pkg" >&2
    done
  fi
  # The deploy, topology and image tests fail under CI=true (and skip otherwise) when a tool is
  # still
  # missing.
fi

echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

# Coverage of the serving components (mlserve/, runners/, service.py), measured in this process
# and in every server, worker and CLI process the tests start: COVERAGE_PROCESS_START makes
# coverage's own .pth hook start it in each Python process; the data are combined at the end.
export COVERAGE_DATA_DIR="$PWD/.coverage-data" COVERAGE_PROCESS_START="$PWD/pyproject.toml"
rm -rf "$COVERAGE_DATA_DIR" && mkdir -p "$COVERAGE_DATA_DIR"

echo "==> pytest"
set +e
.venv/bin/python -m pytest -q --durations=25 "${@:-tests}"
status=$?
set -e
unset COVERAGE_PROCESS_START

echo "==> coverage"
.venv/bin/coverage combine -q --data-file="$COVERAGE_DATA_DIR/.coverage" "$COVERAGE_DATA_DIR"
if [ "$#" -eq 0 ]; then
  # The whole suite: the gate (fail_under in pyproject.toml) applies.
  if ! .venv/bin/coverage report --data-file="$COVERAGE_DATA_DIR/.coverage"; then
    echo "error: coverage of the serving components is under the fail_under gate" >&2
    [ "$status" -eq 0 ] && status=2
  fi
else
  .venv/bin/coverage report --data-file="$COVERAGE_DATA_DIR/.coverage" --fail-under=0
fi
exit "$status"
