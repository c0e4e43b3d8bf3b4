#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite on CPU (no network, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m pytest -q "$@"
