#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs exactly what requirements/dev.lock.txt pins (hashes checked), then the
# project itself without dependencies. Runs again only when the lock file or pyproject.toml changed.
# Sourced by scripts/dev.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required, found " + sys.version.split()[0])'
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv ..." >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml requirements/dev.lock.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing notification-dispatcher and its test tools into .venv from requirements/dev.lock.txt ..." >&2
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements/dev.lock.txt >&2
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . >&2
  rm -f .venv/.installed-* && touch "$stamp"
fi
