# Daily commands. `just` itself: `pip install rust-just` (or your package manager).

# Bring up embedded Postgres + API + worker + mock provider (Quickstart)
dev *ARGS:
    bash scripts/dev.sh {{ARGS}}

# Run the whole test suite (starts its own Postgres)
test *ARGS:
    bash scripts/test.sh {{ARGS}}

# Re-resolve the lock files (requirements/*.txt) from pyproject.toml's ranges, reinstall .venv from them, run the suite
lock *ARGS:
    bash scripts/lock.sh {{ARGS}}
    bash scripts/test.sh

# The linter and the formatter check, as .ci/run runs them (`just fmt` to apply the formatter)
lint:
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .

fmt:
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .

# Only the SQL function tests
test-sql *ARGS:
    bash scripts/test.sh tests/sql {{ARGS}}

# Apply migrations to $DATABASE_URL
migrate:
    .venv/bin/dispatcher migrate

# API only, against $DATABASE_URL
serve *ARGS:
    .venv/bin/dispatcher serve {{ARGS}}

# Worker only, against $DATABASE_URL
worker:
    .venv/bin/dispatcher worker

# Check that landed migrations are unchanged
verify-migrations:
    .venv/bin/python -m dispatcher.schema verify

# Record the checksum of a new migration (never rewrites a recorded one)
record-migration:
    .venv/bin/python -m dispatcher.schema record

# Benchmark suite (not part of CI): starts its own Postgres, API and worker; writes bench/results/latest.{json,md}
bench *ARGS:
    command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
    bash scripts/bootstrap.sh
    .venv/bin/python -m bench.run {{ARGS}}

# Only the peers and limits (graphile-worker, plain SQL, pgbench's insert) and direct SQL submission: scenarios 8 and 9.
# Installs graphile-worker from bench/peers/package-lock.json (npm ci) for the bench only, never for the service
bench-peers *ARGS:
    bash scripts/bootstrap.sh
    cd bench/peers && npm ci --no-audit --no-fund
    .venv/bin/python -m bench.run --only 8,9 {{ARGS}}
