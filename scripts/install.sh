# Shared by run_local.sh and run_tests.sh: create .venv if missing and install mlserve with the
# given extras. Re-installs only when pyproject.toml or the extras change.
install_mlserve() {
  local extras="$1"
  local py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for candidate in python3.11 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
    done
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $py ($("$py" --version 2>&1))"
    "$py" -m venv .venv
  fi
  local stamp=".venv/.mlserve-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "==> installing mlserve[$extras] into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch is pinned to 2.13.0 (the CPU wheel); a loose range would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$stamp"
  fi
}
