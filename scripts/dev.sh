#!/usr/bin/env bash
# Quickstart: brings up the whole service (embedded PostgreSQL, API on :8000, worker, mock provider).
# Extra arguments go to `dispatcher dev`, e.g. scripts/dev.sh --port 9000.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
exec .venv/bin/dispatcher dev "$@"
