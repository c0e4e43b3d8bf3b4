#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with the test tools.
# torch goes first, pinned by constraints.txt, so nothing can pull a CUDA build.
# Idempotent: skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# redis-server (Debian package) for the shared job store tests, when missing and installable
if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
            || echo "setup.sh: could not install redis-server; tests/test_jobs_redis.py will fail" >&2
    else
        echo "setup.sh: redis-server is missing and apt-get is not usable here (not root?):" \
             "install it (apt-get install redis-server) or tests/test_jobs_redis.py will fail" >&2
    fi
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt "$(grep '^torch==' constraints.txt)"
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[server,dev]"
    rm -f .venv/.installed-*; touch "$stamp"
fi
