#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with the test tools.
# torch goes first, pinned by constraints.txt, so nothing can pull a CUDA build.
# Idempotent: skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt "$(grep '^torch==' constraints.txt)"
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    rm -f .venv/.installed-*; touch "$stamp"
fi
