#!/usr/bin/env bash
# The main job: set up .venv if needed, then serve the embedded default model over HTTP (no download) on
# 127.0.0.1:8000 (override with ACCEL_HOST / ACCEL_PORT or a --config file). Extra arguments go to `accel-server`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/accel-server "$@"
