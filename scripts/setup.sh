#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with the test tools.
# torch goes first, pinned by constraints.txt, so nothing can pull a CUDA build.
# Idempotent: skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Debian packages the tests use, when missing and installable: redis-server (shared job store tests) and
# chromium (the playground's browser test; Playwright drives it, no browser download)
apt_install() {  # apt_install <command> <package> <test file>
    command -v "$1" >/dev/null && return
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null) \
            || echo "setup.sh: could not install $2; $3 will fail" >&2
    else
        echo "setup.sh: $1 is missing and apt-get is not usable here (not root?):" \
             "install it (apt-get install $2) or $3 will fail" >&2
    fi
}
apt_install redis-server redis-server tests/test_jobs_redis.py
apt_install chromium chromium tests/test_playground.py
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt "$(grep '^torch==' constraints.txt)"
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[server,dev]"
    rm -f .venv/.installed-*; touch "$stamp"
fi
