#!/usr/bin/env bash
# Install mlserve into .venv, train the demo models if the store lacks them, and serve.
#   ./run_local.sh                 serve on 127.0.0.1:3000
#   MLSERVE_PORT=3100 ./run_local.sh
# Respects BENTOML_HOME (the model store) and every MLSERVE_* setting (see .env.example).
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/install.sh
source scripts/install.sh
install_mlserve "train,torch,load"

export HF_HUB_OFFLINE=1
echo "==> demo models (skipped when already in ${BENTOML_HOME:-$HOME/bentoml})"
.venv/bin/mlserve train --demo
.venv/bin/mlserve list

echo "==> serving on http://${MLSERVE_HOST:-127.0.0.1}:${MLSERVE_PORT:-3000}"
exec .venv/bin/mlserve serve
