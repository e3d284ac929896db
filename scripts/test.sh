#!/usr/bin/env bash
# Quickstart: runs the full test suite (it starts its own embedded PostgreSQL).
# Extra arguments go to pytest, e.g. scripts/test.sh -k idempotency.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
