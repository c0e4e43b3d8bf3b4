#!/usr/bin/env bash
# The main job on the embedded default model (no download): set up .venv if needed, then generate one image
# with an accelerator and print what it did. Extra arguments go to `accel generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/accel generate --model tiny-flux --prompt "a red circle on the left" --steps 20 \
    --accel balanced --out out/example.png --report "$@"
