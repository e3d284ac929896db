"""The benchmark suite: `python -m bench.run` (or `just bench`).

It starts its own PostgreSQL (embedded), the API (2 uvicorn workers, as on a 2-core host), the worker and the
mock provider, runs each scenario after a warm-up, and writes bench/results/latest.json and docs/benchmarks.md.
Every figure is reported next to a baseline measured in the same run on the same machine, so ratios hold on a
noisy machine. Needs `wrk` (Debian package; `just bench` installs it). Scenarios 8 (the peers and limits:
graphile-worker, plain SQL, pgbench's insert) and 9 (direct SQL submission) are in bench/limits.py; they need
pgbench (the embedded wheel has it) and, for graphile-worker, Node and npm (without them those rows are skipped).
Scenario 10 (retention: dropping a day of history against deleting it) runs bench/retention.py on a database of its own.
Scenario 11 (priority and fairness: a tenant's trickle beside another tenant's bulk backlog) is in bench/fairness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", module="platformdirs")

from bench import fairness, limits  # noqa: E402
from dispatcher import keys, schema  # noqa: E402
from dispatcher.embedded import EmbeddedPostgres  # noqa: E402

TEMPLATE = {
    "locale": "en",
    "channels": {
        "email": {"subject": "Reminder: {{event}}", "text": "Hi {{name}}, see you at {{event}}."},
        "whatsapp": {"name": "event_reminder", "language": "en", "parameters": ["name", "event"]},
    },
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """Postgres, API and worker processes for one run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pg = EmbeddedPostgres(work / "pgdata")
        self.url = self.pg.ensure_database("bench")
        schema.migrate(self.url)
        with psycopg.connect(self.url, autocommit=True) as conn:
            tenant = conn.execute("select notify_api.create_tenant_v1('bench')").fetchone()[0]  # type: ignore[index]
            self.tenant_id = tenant["id"]
            self.key = keys.generate()
            conn.execute(
                "select notify_api.create_api_key_v1(%s, 'bench', %s, %s)",
                (self.tenant_id, keys.display_prefix(self.key), keys.digest(self.key)),
            )
            conn.execute("select notify_api.upsert_template_v1(%s, 'event_reminder', %s)", (self.tenant_id, Jsonb(TEMPLATE)))
            conn.execute("select notify_api.set_api_rate_v1(%s, 1000000)", (self.tenant_id,))  # measure, not throttle
            conn.execute("create table if not exists public.bench_baseline (id bigserial primary key, payload jsonb not null)")
        self.port = free_port()
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        env.update(
            {
                "DATABASE_URL": self.url,
                "PYTHONPATH": str(ROOT),
                "DISPATCHER_LOG_LEVEL": "WARNING",
                "DISPATCHER_PORT": str(self.port),
                "DISPATCHER_BENCH_BASELINE": "1",
                "DISPATCHER_MOCK_RECORD": "0",
                "DISPATCHER_POOL_MIN": "8",
                "DISPATCHER_POOL_MAX": "16",
            }
        )
        env.update(extra)
        return env

    def start_api(self, workers: int = 2) -> None:
        self.api = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "serve", "--port", str(self.port), "--workers", str(workers)],
            env=self.env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "api.log").open("ab"),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("API did not start")

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "worker"],
            env=self.env(**env),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(self.work / "worker.log").open("ab"),
        )
        return self.worker

    @staticmethod
    def stop(proc: subprocess.Popen[bytes] | None) -> None:
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def sql(self, query: str, *params: Any) -> Any:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            if cur.description is None:
                return cur.rowcount
            row = cur.fetchone()
            return row[0] if row else None

    def close(self) -> None:
        self.stop(self.worker)
        self.stop(self.api)
        self.pg.stop()


def rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of a process and its children, the largest one."""
    peaks = []
    for p in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
            peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
    return round(max(peaks), 1) if peaks else 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --- scenario 1: ingest ------------------------------------------------------------------------------------


def wrk(stack: Stack, path: str, key: str, seconds: int, connections: int = 32, delay_ms: float = 0) -> dict[str, float]:
    env = {
        **os.environ,
        "BENCH_PATH": path,
        "BENCH_KEY": key,
        "BENCH_DELAY_MS": str(int(delay_ms)),
        "BENCH_RUN": f"{time.time_ns()}",
    }
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "post.lua"),
            f"http://127.0.0.1:{stack.port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    # a replayed key answers 200 too: count what was really created, so a replay can never pass for ingest
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def scenario_ingest(stack: Stack, seconds: int, warmup: int) -> dict[str, Any]:
    log("ingest: warm-up")
    wrk(stack, "/internal/notifications", stack.key, warmup)
    wrk(stack, "/bench/baseline", "", warmup)
    log(f"ingest: {seconds}s each, 32 connections")
    before = stack.sql("select count(*) from notify.notification_requests")
    ours = wrk(stack, "/internal/notifications", stack.key, seconds)
    created = stack.sql("select count(*) from notify.notification_requests") - before
    ours["created"] = created
    if created < ours["rps"] * seconds * 0.95:
        raise RuntimeError(f"ingest: only {created} of ~{ours['rps'] * seconds:.0f} requests created new notifications")
    base = wrk(stack, "/bench/baseline", "", seconds)
    return {"ours": ours, "baseline": base, "ratio": round(ours["rps"] / base["rps"], 3)}


# --- scenario 2: fan-out and batch ------------------------------------------------------------------------


def fanout_body(n: int, prefix: str) -> dict[str, Any]:
    return {
        "recipients": [
            {"ref": f"{prefix}-{i}", "addresses": {"email": f"{prefix}{i}@example.com"}, "variables": {"name": f"M{i}"}}
            for i in range(n)
        ],
        "channels": ["email"],
        "template": "event_reminder",
        "variables": {"event": "Long run"},
    }


def scenario_volume(stack: Stack, runs: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {stack.key}"}
    base = f"http://127.0.0.1:{stack.port}"
    with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
        new, known = [], []
        for run in range(runs):
            body = fanout_body(10_000, f"club{run}")
            raw = json.dumps(body).encode()
            t0 = time.perf_counter()
            r = c.post("/internal/notifications", content=raw, headers={"content-type": "application/json"})
            new.append(time.perf_counter() - t0)
            assert r.status_code == 202, r.text[:300]
            t0 = time.perf_counter()
            r = c.post("/internal/notifications", content=raw, headers={"content-type": "application/json"})
            known.append(time.perf_counter() - t0)
            assert r.status_code == 202, r.text[:300]
        batches = []
        for run in range(runs):
            items = [
                {
                    "idempotency_key": f"batch{run}-{i}",
                    "notification": {
                        "recipient": {"ref": f"member-{i}", "addresses": {"email": f"member{i}@example.com"}},
                        "channels": ["email"],
                        "template": "event_reminder",
                        "variables": {"name": "Ana", "event": "Long run"},
                    },
                }
                for i in range(1000)
            ]
            t0 = time.perf_counter()
            r = c.post("/internal/notifications/batch", json={"items": items})
            batches.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["accepted"] == 1000, r.text[:300]
    return {
        "fanout_10k_new_recipients_s": round(statistics.median(new), 3),
        "fanout_10k_known_recipients_s": round(statistics.median(known), 3),
        "fanout_deliveries_per_s": round(10_000 / statistics.median(known)),
        "batch_1000_s": round(statistics.median(batches), 3),
        "batch_deliveries_per_s": round(1000 / statistics.median(batches)),
    }


# --- scenarios 3 and 4: dispatch -----------------------------------------------------------------------------


def backlog(stack: Stack, n: int, prefix: str) -> None:
    """n queued e-mail deliveries, submitted as 10,000-recipient fan-outs with the worker stopped."""
    with httpx.Client(
        base_url=f"http://127.0.0.1:{stack.port}", headers={"Authorization": f"Bearer {stack.key}"}, timeout=120
    ) as c:
        for chunk in range(0, n, 10_000):
            size = min(10_000, n - chunk)
            r = c.post("/internal/notifications", json=fanout_body(size, f"{prefix}{chunk}"))
            assert r.status_code == 202, r.text[:300]


def drain(stack: Stack, n: int, **env: str) -> dict[str, Any]:
    stack.sql("delete from procrastinate_jobs where status = 'todo' and task_name = 'dispatch'")
    started = stack.sql("select now()")
    worker = stack.start_worker(**env)
    deadline = time.monotonic() + 900
    # Polled through the queue's and the leases' partial indexes: a count over every delivery scanned the whole table
    # four times a second during the drain (80 ms at 280,000 rows, far more after scenario 6's growth).
    while stack.sql(
        "select exists (select from notify.notification_deliveries where status in ('queued', 'scheduled') and status = 'queued')"
        " or exists (select from notify.notification_deliveries where status = 'sending')"
    ):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError("dispatch did not finish")
        time.sleep(0.25)
    span = stack.sql(
        "select extract(epoch from max(finished_at) - min(started_at)) from notify.delivery_attempts where started_at >= %s",
        started,
    )
    done = stack.sql("select count(*) from notify.delivery_attempts where started_at >= %s and outcome = 'sent'", started)
    peak = rss_mb(worker.pid)
    stack.stop(worker)
    return {"deliveries": done, "seconds": round(float(span), 2), "per_s": round(done / float(span)), "worker_peak_rss_mb": peak}


def procrastinate_baseline(stack: Stack, n: int) -> dict[str, Any]:
    env = stack.env()
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import asyncio
from bench.baseline_app import app, noop
async def main():
    async with app.open_async():
        for start in range(0, {n}, 1000):
            await noop.batch_defer_async(*({{"n": i}} for i in range(start, min({n}, start + 1000))))
asyncio.run(main())
""",
        ],
        env=env,
        cwd=ROOT,
        check=True,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "procrastinate",
            "--app=bench.baseline_app.app",
            "worker",
            "--queues",
            "bench",
            "--concurrency",
            "2",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 900
    while stack.sql("select count(*) from procrastinate_jobs where queue_name = 'bench' and status in ('todo', 'doing')") > 0:
        if time.monotonic() > deadline:
            raise RuntimeError("baseline did not finish")
        time.sleep(0.25)
    stack.stop(worker)
    span = stack.sql("""select extract(epoch from max(e.at) filter (where e.type = 'succeeded') - min(e.at) filter (where
      e.type = 'started'))
                          from procrastinate_events e join procrastinate_jobs j on j.id = e.job_id where j.queue_name =
                            'bench'""")
    return {"jobs": n, "seconds": round(float(span), 2), "per_s": round(n / float(span))}


# --- scenario 5: end-to-end latency ------------------------------------------------------------------------


def scenario_latency(stack: Stack, rate: float, seconds: int) -> dict[str, Any]:
    """wrk, paced by its delay() hook (16 connections, each waiting 16/rate s between requests): a C load
    generator, so the measurement does not steal the worker's CPU the way a Python one would."""
    worker = stack.start_worker()
    time.sleep(3)
    since = stack.sql("select now()")
    connections = 16
    load = wrk(stack, "/internal/notifications", stack.key, seconds, connections=connections, delay_ms=1000 * connections / rate)
    time.sleep(3)
    stack.stop(worker)
    with psycopg.connect(stack.url) as conn:
        row = conn.execute(
            """select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms), count(*)
                                from (select extract(epoch from a.started_at - r.created_at) * 1000 as ms
                                        from notify.notification_requests r
                                        join notify.notification_deliveries d on d.tenant_id = r.tenant_id and d.request_id = r.id
                                        join notify.delivery_attempts a on a.tenant_id = d.tenant_id and a.delivery_id = d.id
                                          and a.attempt = 1
                                       where r.created_at >= %s) x""",
            (since,),
        ).fetchone()
        submitted = conn.execute("select count(*) from notify.notification_requests where created_at >= %s", (since,)).fetchone()
    assert row is not None and submitted is not None
    if not row[2]:
        raise RuntimeError(
            f"latency: nothing was dispatched (wrk: {load}, submitted: {submitted[0]}); see {stack.work}/worker.log"
        )
    return {
        "rate_per_s": round(load["rps"]),
        "target_rate_per_s": round(rate),
        "submitted": submitted[0],
        "measured": row[2],
        "non_2xx": load["non_2xx"],
        "p50_ms": round(row[0], 1),
        "p99_ms": round(row[1], 1),
    }


# --- scenario 6: growth -------------------------------------------------------------------------------------


def grow(stack: Stack, finished: int, scheduled: int) -> None:
    log(f"growth: inserting {finished:,} finished and {scheduled:,} scheduled deliveries")
    with psycopg.connect(stack.url, autocommit=True) as conn:
        conn.execute("set notify.source = 'bench'")
        rid = conn.execute(
            """insert into notify.recipients (tenant_id, ref) values (%s, 'growth') returning id""", (stack.tenant_id,)
        ).fetchone()[0]  # type: ignore[index]
        for status, total, due in (
            ("delivered", finished, "now() - interval '1 day'"),
            ("scheduled", scheduled, "now() + interval '30 days'"),
        ):
            for start in range(0, total, 100_000):
                size = min(100_000, total - start)
                req = conn.execute(
                    """insert into notify.notification_requests (tenant_id, fingerprint, recipient_id, template_key, channels)
                                      values (%s, '\\x00', %s, 'event_reminder', '{email}') returning id""",
                    (stack.tenant_id, rid),
                ).fetchone()[0]  # type: ignore[index]
                # one request per 100,000 rows; recipient varies by a generated recipient row each
                conn.execute(
                    f"""
                    with r as (insert into notify.recipients (tenant_id, ref)
                               select %s, 'growth-{status}-' || ({start} + g) from generate_series(1, {size}) g returning id)
                    insert into notify.notification_deliveries (tenant_id, request_id, recipient_id, channel, address,
                      template_locale,
                                                                status, attempt, due_at, finished_at, delivered_at, sent_at)
                    select %s, %s, r.id, 'email', 'growth@example.com', 'en', '{status}', {1 if status == "delivered" else 0}, {
                        due
                    },
                           {"now()" if status == "delivered" else "null"}, {"now()" if status == "delivered" else "null"},
                           {"now()" if status == "delivered" else "null"}
                      from r""",
                    (stack.tenant_id, stack.tenant_id, req),
                )
        conn.execute("analyze")


# --- report ---------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 // 1024  # type: ignore[union-attr]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "missed"


def peer_rows(peers: dict[str, Any], graphile_absent: str | None) -> list[str]:
    """Scenario 8's own figures (each is also beside ours in the rows above)."""
    rows = []
    if "insert" in peers:
        s = peers["insert"]
        rows.append(
            f"| 8 | write limit: single-row INSERT of scenario 1's body, pgbench, {s['clients']} clients, no HTTP (for 1) "
            f"| — | {s['tps']:,.0f} tps, average {s['latency_ms']} ms | — | — | |"
        )
    if "graphile_add_job" in peers:
        s = peers["graphile_add_job"]
        rows.append(
            f"| 8 | graphile-worker add_job, one per call, pgbench, {s['clients']} clients (peer of 9) | — "
            f"| {s['tps']:,.0f} jobs/s, average {s['latency_ms']} ms | — | — | |"
        )
    if "graphile_drain" in peers:
        s = peers["graphile_drain"]
        rows.append(
            f"| 8 | graphile-worker draining {s['jobs']:,} no-op jobs, concurrency {s['concurrency']} (peer of 3) | — "
            f"| {s['per_s']:,} jobs/s ({s['seconds']} s) | — | — | |"
        )
    if graphile_absent:
        rows.append(f"| 8 | graphile-worker | — | {graphile_absent} | — | — | |")
    if "plain_dispatch" in peers:
        s = peers["plain_dispatch"]
        rows.append(
            f"| 8 | dispatch limit: claim (SKIP LOCKED) + record (one unnest UPDATE) in plain SQL, history trigger, "
            f"batches of {limits.BATCH} (for 3) | — | {s['connections_1']['per_s']:,} rows/s on 1 connection, "
            f"{s['connections_2']['per_s']:,} rows/s on 2 | — | — | |"
        )
    return rows


def report(results: dict[str, Any], out: Path) -> str:
    r = results
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Latest run: {m['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
        f"PostgreSQL {r.get('postgres_version', '?')} (embedded, default settings: fsync and synchronous_commit on). "
        "Everything (load generator, API with 2 workers, worker, Postgres) shares the same 2 cores. Produced by "
        "`just bench` (`python -m bench.run`); raw figures in `bench/results/latest.json`.",
        "",
        "| # | scenario | ours | baseline (same run) | ratio / figure | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    peers = r.get("peers", {})
    graphile_absent = f"graphile-worker not run: {peers['graphile_skipped']}" if "graphile_skipped" in peers else None
    if "ingest" in r:
        i = r["ingest"]
        write_limit = ""
        if "insert" in peers:
            write_limit = (
                f"; write limit {peers['insert']['tps']:,.0f} tps (pgbench single-row INSERT, {peers['insert']['clients']} "
                f"clients, no HTTP: ours is {i['ours']['rps'] / peers['insert']['tps']:.0%} of it)"
            )
        lines.append(
            f"| 1 | ingest, 32 connections | {i['ours']['rps']:.0f} req/s, p50 {i['ours']['p50_ms']:.1f} ms, p99 "
            f"{i['ours']['p99_ms']:.1f} ms "
            f"| {i['baseline']['rps']:.0f} req/s (one-INSERT endpoint), p50 {i['baseline']['p50_ms']:.1f} ms{write_limit} "
            f"| {i['ratio']:.0%} | ≥ 50% of the endpoint | {verdict(i['ratio'], 0.5)} |"
        )
    if "volume" in r:
        v = r["volume"]
        lines.append(
            f"| 2 | fan-out, 10,000 recipients (known / new) | {v['fanout_10k_known_recipients_s']} s / "
            f"{v['fanout_10k_new_recipients_s']} s "
            f"({v['fanout_deliveries_per_s']:,} deliveries/s) | — | — | < 1 s | "
            f"{verdict(v['fanout_10k_known_recipients_s'], 1.0, False)} |"
        )
        lines.append(
            f"| 2 | batch, 1,000 intents | {v['batch_1000_s']} s ({v['batch_deliveries_per_s']:,} deliveries/s) | — | — "
            f"| ≥ 10,000 deliveries/s | {verdict(v['batch_deliveries_per_s'], 10_000)} |"
        )
    if "dispatch_0ms" in r:
        d = r["dispatch_0ms"]
        ours = f"{d['ours']['per_s']:,} deliveries/s"
        scenario = f"| 3 | dispatch, provider 0 ms, backlog {d['ours']['deliveries']:,}"
        if "graphile_drain" in peers:
            g = peers["graphile_drain"]
            ratio = d["ours"]["per_s"] / g["per_s"]
            lines.append(
                f"{scenario} | {ours} | {g['per_s']:,} jobs/s (graphile-worker draining {g['jobs']:,} no-op jobs, "
                f"concurrency {g['concurrency']}) | {ratio:.1f}× | ≥ 5× | {verdict(ratio, 5)} |"
            )
        elif graphile_absent:
            lines.append(f"{scenario} | {ours} | {graphile_absent} | — | ≥ 5× | |")
        if "plain_dispatch" in peers:
            lim = peers["plain_dispatch"]
            ratio = d["ours"]["per_s"] / lim["best"]
            lines.append(
                f"| 3 | dispatch against the plain-SQL limit | {ours} | {lim['best']:,} deliveries/s (claim + record in "
                f"plain SQL, batches of {limits.BATCH}: {lim['connections_1']['per_s']:,}/s on 1 connection, "
                f"{lim['connections_2']['per_s']:,}/s on 2) | {ratio:.0%} | ≥ 50% | {verdict(ratio, 0.5)} |"
            )
        lines.append(
            f"| 3 | dispatch against plain procrastinate (reference) | {ours} | {d['baseline']['per_s']:,} no-op jobs/s "
            f"(plain procrastinate, concurrency 2) | {d['ratio']:.1f}× | — | |"
        )
    if "dispatch_100ms" in r:
        d = r["dispatch_100ms"]
        lines.append(
            f"| 4 | dispatch, provider 100 ms, in-flight {d['in_flight']} | {d['ours']['per_s']:,} deliveries/s | ceiling "
            f"{d['ceiling']:,}/s "
            f"| {d['ratio']:.0%} | ≥ 80% | {verdict(d['ratio'], 0.8)} |"
        )
    if "latency" in r:
        lat = r["latency"]
        lines.append(
            f"| 5 | submit → provider call at {lat['rate_per_s']} req/s (half of max ingest) | p50 {lat['p50_ms']} ms, p99 "
            f"{lat['p99_ms']} ms "
            f"| — | — | p50 ≤ 20, p99 ≤ 150 ms | {verdict(max(lat['p50_ms'] / 20, lat['p99_ms'] / 150), 1.0, False)} |"
        )
    if "growth" in r:
        g = r["growth"]
        lines.append(
            f"| 6 | growth (+{g['finished']:,} finished, +{g['scheduled']:,} scheduled): ingest | {g['ingest_rps']:.0f} req/s | "
            f"{g['empty_ingest_rps']:.0f} req/s empty | {g['ingest_ratio']:.0%} | ≥ 80% | {verdict(g['ingest_ratio'], 0.8)} |"
        )
        lines.append(
            f"| 6 | growth: dispatch | {g['dispatch_per_s']:,}/s | {g['empty_dispatch_per_s']:,}/s empty | "
            f"{g['dispatch_ratio']:.0%} | ≥ 90% | {verdict(g['dispatch_ratio'], 0.9)} |"
        )
    if "fairness" in r:
        lines += fairness.report_rows(r["fairness"])
    if "retention" in r:
        t = r["retention"]
        b, d, x = t["baseline"], t["during_drop"], t["during_delete"]
        day = f"a day of {t['deliveries']:,} finished deliveries' history ({t['history_rows']:,} rows)"
        deleted = f"deleted in {t['delete_ms']:,.0f} ms (+ vacuum {t['vacuum_after_delete_ms']:,.0f} ms)"
        lines.append(
            f"| 10 | retention: {day} | dropped in {t['drop_ms']:,.0f} ms | {deleted} | {t['delete_over_drop']}× | — | |"
        )
        during = f"during the drop {d['ingest_per_s']}/s / {d['dispatch_per_s']}/s"
        others = f"idle {b['ingest_per_s']}/s / {b['dispatch_per_s']}/s; "
        others += f"during the delete {x['ingest_per_s']}/s / {x['dispatch_per_s']}/s"
        slowest = f"slowest submission {d['ingest_slowest_ms']} ms (delete: {x['ingest_slowest_ms']} ms)"
        lines.append(f"| 10 | retention: ingest / dispatch over SQL meanwhile | {during} | {others} | {slowest} | — | |")
    if "rss" in r:
        s = r["rss"]
        lines.append(
            f"| 7 | peak RSS: API worker process / dispatch worker with {s['in_flight']} in flight | {s['api_mb']} MB / "
            f"{s['worker_mb']} MB | — | — | worker ≤ 200 MB | {verdict(s['worker_mb'], 200, False)} |"
        )
    lines += peer_rows(peers, graphile_absent)
    if "direct_sql" in r:
        s = r["direct_sql"]
        ours = f"{s['tps']:,.0f} submissions/s, average {s['latency_ms']} ms"
        if "graphile_add_job" in peers:
            add_job = peers["graphile_add_job"]
            ratio = s["tps"] / add_job["tps"]
            lines.append(
                f"| 9 | direct SQL submission, {s['clients']} connections (pgbench, a notify_caller login) | {ours} "
                f"| {add_job['tps']:,.0f} jobs/s (graphile-worker add_job, pgbench, {add_job['clients']} clients) | {ratio:.0%} "
                f"| ≥ 100% | {verdict(ratio, 1.0)} |"
            )
        else:
            lines.append(
                f"| 9 | direct SQL submission, {s['clients']} connections (pgbench, a notify_caller login) | {ours} "
                f"| {graphile_absent or 'graphile-worker add_job not measured (scenario 8)'} | — | ≥ 100% | |"
            )
    text = "\n".join(lines) + "\n"
    (out / "latest.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="measured time of each timed scenario")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backlog", type=int, default=100_000, help="deliveries drained in scenario 3")
    parser.add_argument("--baseline-jobs", type=int, default=20_000, help="no-op jobs run by plain procrastinate")
    parser.add_argument("--growth-finished", type=int, default=1_000_000)
    parser.add_argument("--growth-scheduled", type=int, default=100_000)
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11", help="comma-separated scenario numbers")
    parser.add_argument("--retention-deliveries", type=int, default=1_000_000, help="deliveries in scenario 10's day of history")
    parser.add_argument("--fairness-backlog", type=int, default=100_000, help="tenant A's backlog in scenario 11")
    parser.add_argument("--fairness-rate", type=float, default=fairness.B_RATE, help="tenant B's submissions/s in scenario 11")
    parser.add_argument("--fairness-priority", default="bulk", choices=["high", "normal", "bulk"], help="tenant A's priority")
    parser.add_argument("--fairness-batch", type=int, default=500, help="the worker's batch size in scenario 11 (scenario 3's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk; `just bench` does it)")
    only = {int(x) for x in args.only.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    stack = Stack(work)
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "postgres_version": stack.sql("show server_version")}
    # scenario 8's figures are measured each right after the scenario of ours it is the peer or limit of
    peers: dict[str, Any] = {}
    if 8 in only:
        results["peers"] = peers
    skipped = limits.graphile_missing() if 8 in only else None  # installs graphile-worker (npm ci) if needed
    graphile = 8 in only and skipped is None
    if skipped:
        peers["graphile_skipped"] = skipped
        log(f"peers: graphile-worker skipped, {skipped}")
    try:
        stack.start_api()
        if 1 in only or 5 in only or 6 in only:
            results["ingest"] = scenario_ingest(stack, args.seconds, args.warmup)
            log(f"ingest: {results['ingest']}")
        if 8 in only:
            log(f"peers: single-row INSERT, pgbench, {limits.CLIENTS} clients, {args.seconds}s")
            peers["insert"] = limits.insert_limit(stack, args.seconds, args.warmup)
            log(f"peers: insert: {peers['insert']}")
        if graphile:
            log(f"peers: graphile-worker add_job, pgbench, {limits.CLIENTS} clients, {args.seconds}s")
            peers["graphile_add_job"] = limits.graphile_add_job(stack, args.seconds, args.warmup)
            log(f"peers: graphile add_job: {peers['graphile_add_job']}")
        if 9 in only:
            log(f"direct SQL submission: pgbench, {limits.CLIENTS} connections as a notify_caller login, {args.seconds}s")
            results["direct_sql"] = limits.direct_sql(stack, args.seconds, args.warmup)
            log(f"direct SQL: {results['direct_sql']}")
        if 2 in only:
            results["volume"] = scenario_volume(stack, 3)
            log(f"volume: {results['volume']}")
        # what scenarios 1 and 2 queued is not part of the dispatch backlogs
        stack.sql("set notify.source = 'bench'")
        stack.sql("update notify.notification_deliveries set status = 'cancelled' where status in ('queued', 'scheduled')")
        if 3 in only or 6 in only:
            log(f"dispatch 0 ms: backlog of {args.backlog:,}")
            backlog(stack, args.backlog, "d0-")
            ours = drain(stack, args.backlog, DISPATCHER_BATCH_SIZE="500", DISPATCHER_MAX_IN_FLIGHT="1000")
            results["dispatch_0ms"] = {"ours": ours}
            log(f"dispatch 0 ms: {ours}")
        if graphile:
            log(f"peers: graphile-worker draining {limits.GRAPHILE_JOBS:,} no-op jobs, concurrency {limits.GRAPHILE_CONCURRENCY}")
            peers["graphile_drain"] = limits.graphile_drain(stack)
            log(f"peers: graphile drain: {peers['graphile_drain']}")
        if 8 in only:
            log(f"peers: plain-SQL claim + record of {limits.LIMIT_ROWS:,} deliveries, batches of {limits.BATCH}")
            peers["plain_dispatch"] = limits.plain_dispatch_limit(stack)
            log(f"peers: plain-SQL limit: {peers['plain_dispatch']}")
        if 3 in only or 6 in only:  # plain procrastinate last: at ~250 jobs/s it takes minutes, the peers go first
            base = procrastinate_baseline(stack, args.baseline_jobs)
            ours = results["dispatch_0ms"]["ours"]
            results["dispatch_0ms"].update(baseline=base, ratio=round(ours["per_s"] / base["per_s"], 1))
            log(f"dispatch 0 ms against plain procrastinate: {results['dispatch_0ms']}")
        if 4 in only:
            n, in_flight = 30_000, 200
            log(f"dispatch 100 ms: backlog of {n:,}, {in_flight} in flight")
            backlog(stack, n, "d100-")
            ours = drain(
                stack,
                n,
                DISPATCHER_MOCK_LATENCY_MS="100",
                DISPATCHER_BATCH_SIZE="100",
                DISPATCHER_MAX_IN_FLIGHT=str(in_flight),
                DISPATCHER_WORKER_CONCURRENCY="1",
            )  # one dispatch job, so the in-flight limit is exact
            ceiling = in_flight * 10  # in-flight limit / 0.1 s
            results["dispatch_100ms"] = {
                "ours": ours,
                "in_flight": in_flight,
                "ceiling": ceiling,
                "ratio": round(ours["per_s"] / ceiling, 3),
            }
            log(f"dispatch 100 ms: {results['dispatch_100ms']}")
        if 7 in only:
            n = 20_000
            log(f"worker memory: backlog of {n:,} at 100 ms, 1,000 in flight")
            backlog(stack, n, "rss-")
            heavy = drain(
                stack, n, DISPATCHER_MOCK_LATENCY_MS="100", DISPATCHER_BATCH_SIZE="100", DISPATCHER_MAX_IN_FLIGHT="1000"
            )
            results["rss"] = {
                "api_mb": rss_mb(stack.api.pid) if stack.api else 0.0,
                "in_flight": 1000,
                "worker_mb": heavy["worker_peak_rss_mb"],
                "deliveries_per_s_at_1000_in_flight": heavy["per_s"],
            }
            log(f"rss: {results['rss']}")
        if 5 in only and "ingest" in results:
            rate = results["ingest"]["ours"]["rps"] / 2
            log(f"latency at {rate:.0f} req/s")
            results["latency"] = scenario_latency(stack, rate, args.seconds)
            log(f"latency: {results['latency']}")
        if 11 in only:  # before the growth, whose 1.1 M rows would be in its drains
            results["fairness"] = fairness.scenario_fairness(
                stack,
                args.fairness_backlog,
                args.seconds,
                priority=args.fairness_priority,
                rate=args.fairness_rate,
                batch=args.fairness_batch,
                scenario3=results.get("dispatch_0ms", {}).get("ours"),
            )
            log(f"fairness: {results['fairness']}")
        if 6 in only:
            grow(stack, args.growth_finished, args.growth_scheduled)
            ingest = wrk(stack, "/internal/notifications", stack.key, args.seconds)
            backlog(stack, min(args.backlog, 50_000), "g-")
            dispatch = drain(stack, min(args.backlog, 50_000), DISPATCHER_BATCH_SIZE="500", DISPATCHER_MAX_IN_FLIGHT="1000")
            results["growth"] = {
                "finished": args.growth_finished,
                "scheduled": args.growth_scheduled,
                "ingest_rps": ingest["rps"],
                "empty_ingest_rps": results["ingest"]["ours"]["rps"],
                "ingest_ratio": round(ingest["rps"] / results["ingest"]["ours"]["rps"], 3),
                "dispatch_per_s": dispatch["per_s"],
                "empty_dispatch_per_s": results["dispatch_0ms"]["ours"]["per_s"],
                "dispatch_ratio": round(dispatch["per_s"] / results["dispatch_0ms"]["ours"]["per_s"], 3),
            }
            log(f"growth: {results['growth']}")
    finally:
        stack.close()
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))  # kept if scenario 10 fails
    if 10 in only:
        # Retention on a database of its own (bench/retention.py): a day of history dropped as partitions, against
        # deleting the same rows, with submissions and a drain running meanwhile. Its last line is its figures.
        log(f"retention: a day of {args.retention_deliveries:,} deliveries (bench/retention.py)")
        done = subprocess.run(
            [sys.executable, "-m", "bench.retention", "--deliveries", str(args.retention_deliveries)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            results["retention"] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"retention: drop {results['retention']['drop_ms']} ms, delete {results['retention']['delete_ms']} ms")
        else:
            log(f"retention: bench/retention.py failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results, out))


if __name__ == "__main__":
    main()
