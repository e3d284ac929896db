#!/usr/bin/env bash
# Re-resolves requirements/dev.lock.txt and requirements/deploy.lock.txt (hashed, universal) from pyproject.toml's ranges.
# `just lock` runs this, reinstalls .venv from the result and runs the whole suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
UV_VERSION=0.13.9
if [ ! -x .venv/bin/uv ] || [ "$(.venv/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi
common=(--quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "just lock" "$@")
.venv/bin/uv pip compile "${common[@]}" pyproject.toml requirements/build.in \
  --extra embedded --extra test --extra client --extra otel -o requirements/dev.lock.txt
.venv/bin/uv pip compile "${common[@]}" pyproject.toml requirements/build.in \
  --extra otel -o requirements/deploy.lock.txt
echo "requirements/dev.lock.txt and requirements/deploy.lock.txt written" >&2
