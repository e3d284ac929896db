"""Retention benchmark (issue #15): the time to drop a day of finished deliveries' history (one daily partition of
notify.delivery_events and one of notify.delivery_attempts) against deleting the same rows, with ingest and dispatch
measured while each runs.

    python -m bench.retention [--deliveries 1000000] [--events-per-delivery 3] [--baseline-seconds 10]

A fresh embedded Postgres, the schema from migrations/. The day's history is generated with generate_series straight
into the partitions of a day 100 days ago (3 status events and 1 attempt per delivery by default). The load while each
operation runs is simple and runs over SQL, not HTTP: one connection loops notify_api.submit_notification_v1 (one
e-mail notification per call: ingest), another loops claim_deliveries_v1(email, 100) + record_attempts_v1 (all "sent":
dispatch). Each phase reports the operation's time, the ingest and dispatch rates over it (per second) and the slowest
single call of each, against a baseline phase without retention work. Prints its figures and a JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher import schema  # noqa: E402
from dispatcher.embedded import EmbeddedPostgres  # noqa: E402
from runner.drainer import CLAIM, RECORD  # noqa: E402

TEMPLATE = {
    "locale": "en",
    "channels": {"email": {"subject": "Reminder: {{event}}", "text": "Hi {{name}}, see you at {{event}}."}},
}


def log(msg: str) -> None:
    print(f"[retention {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Load:
    """Ingest and dispatch loops on their own connections; every call's end time and duration are kept."""

    def __init__(self, url: str, tenant_id: str) -> None:
        self.url, self.tenant_id = url, tenant_id
        self.stop = threading.Event()
        self.ingest: list[tuple[float, float]] = []  # (end, seconds) per notification
        self.dispatch: list[tuple[float, float, int]] = []  # (end, seconds, deliveries) per claim+record
        self.threads = [threading.Thread(target=self._ingest, daemon=True), threading.Thread(target=self._dispatch, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _ingest(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {
                    "recipient": {"ref": f"r-{n % 5000}", "addresses": {"email": f"r{n % 5000}@example.com"}},
                    "channels": ["email"],
                    "template": "event_reminder",
                    "variables": {"name": "Ana", "event": "Long run"},
                }
                t0 = time.perf_counter()
                conn.execute("select notify_api.submit_notification_v1(%s, %s)", (self.tenant_id, Jsonb(body)))
                t1 = time.perf_counter()
                self.ingest.append((t1, t1 - t0))

    def _dispatch(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                rows = conn.execute(CLAIM, {"channel": "email", "limit": 100, "lease": 60}).fetchall()
                if rows:
                    results = [
                        {
                            "tenant_id": str(r[0]),
                            "delivery_id": str(r[1]),
                            "attempt": r[2],
                            "outcome": "sent",
                            "provider": "mock",
                            "provider_message_id": f"m-{r[1]}",
                        }
                        for r in rows
                    ]
                    conn.execute(RECORD, {"results": Jsonb(results)}).fetchall()
                t1 = time.perf_counter()
                if rows:
                    self.dispatch.append((t1, t1 - t0, len(rows)))
                else:
                    time.sleep(0.005)

    def window(self, start: float, end: float) -> dict[str, float]:
        span = max(end - start, 1e-9)
        ing = [d for t, d in self.ingest if start <= t <= end]
        dis = [(d, n) for t, d, n in self.dispatch if start <= t <= end]
        return {
            "seconds": round(span, 3),
            "ingest_per_s": round(len(ing) / span, 1),
            "ingest_slowest_ms": round(max(ing, default=0) * 1000, 1),
            "ingest_median_ms": round(statistics.median(ing) * 1000, 2) if ing else 0.0,
            "dispatch_per_s": round(sum(n for _, n in dis) / span, 1),
            "dispatch_slowest_batch_ms": round(max((d for d, _ in dis), default=0) * 1000, 1),
        }


def fill_day(conn: psycopg.Connection, tenant_id: str, day: dt.date, deliveries: int, events_per: int) -> None:
    """A day of finished deliveries' history in that day's partitions: events_per status events and one attempt each."""
    conn.execute("select notify._ensure_partitions(%s, %s)", (day, day))
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    statuses = ["queued", "sending", "sent", "delivered", "read"][:events_per]
    chunk = 250_000
    for first in range(0, deliveries, chunk):
        n = min(chunk, deliveries - first)
        conn.execute("create temporary table if not exists bench_ids (n integer, id uuid, at timestamptz)")
        conn.execute("truncate bench_ids")
        conn.execute(
            """insert into bench_ids
               select g, gen_random_uuid(), %(start)s + (g * (86000.0 / %(total)s::integer)) * interval '1 second'
                 from generate_series(%(first)s::integer, %(last)s::integer) g""",
            {"start": start, "total": deliveries, "first": first, "last": first + n - 1},
        )
        conn.execute(
            """insert into notify.delivery_events (tenant_id, delivery_id, seq, from_status, to_status, source, occurred_at)
               select %(tenant)s, b.id, s.seq, (%(statuses)s::notify.delivery_status[])[s.seq - 1],
                      (%(statuses)s::notify.delivery_status[])[s.seq], 'bench', b.at + s.seq * interval '1 second'
                 from bench_ids b cross join generate_series(1, %(per)s::integer) s(seq)""",
            {"tenant": tenant_id, "statuses": statuses, "per": events_per},
        )
        conn.execute(
            """insert into notify.delivery_attempts (tenant_id, delivery_id, attempt, started_at, finished_at, outcome, provider)
               select %(tenant)s, b.id, 1, b.at + interval '1 second', b.at + interval '2 seconds', 'sent', 'mock'
                 from bench_ids b""",
            {"tenant": tenant_id},
        )


def rows_of_day(conn: psycopg.Connection, day: dt.date) -> int:
    lo = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    hi = lo + dt.timedelta(days=1)
    return sum(
        conn.execute(f"select count(*) from notify.{t} where {c} >= %s and {c} < %s", (lo, hi)).fetchone()[0]  # type: ignore[index]
        for t, c in (("delivery_events", "occurred_at"), ("delivery_attempts", "started_at"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--events-per-delivery", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--work", type=Path, default=None, help="directory for the database (default: a temporary one)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-retention-"))
    pg = EmbeddedPostgres(work / "pgdata")
    url = pg.ensure_database("bench_retention")
    schema.migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        tenant_id = conn.execute("select notify_api.create_tenant_v1(%s)", (f"bench-{uuid.uuid4().hex[:8]}",)).fetchone()[0]["id"]  # type: ignore[index]
        conn.execute("select notify_api.upsert_template_v1(%s, 'event_reminder', %s)", (tenant_id, Jsonb(TEMPLATE)))
        today = conn.execute("select (now() at time zone 'UTC')::date").fetchone()[0]  # type: ignore[index]
        day = today - dt.timedelta(days=100)  # past the default 90 days of history

        log(f"filling {day} with {args.deliveries:,} deliveries' history ({args.events_per_delivery} events + 1 attempt each)")
        t0 = time.perf_counter()
        fill_day(conn, tenant_id, day, args.deliveries, args.events_per_delivery)
        conn.execute("analyze notify.delivery_events, notify.delivery_attempts")
        rows = rows_of_day(conn, day)
        log(f"  {rows:,} rows in {time.perf_counter() - t0:.1f} s")

        load = Load(url, tenant_id)
        load.start()
        time.sleep(2)  # warm up
        b0 = time.perf_counter()
        time.sleep(args.baseline_seconds)
        baseline = load.window(b0, time.perf_counter())
        log(f"baseline: {baseline}")

        # 1. Retention as built: the day's partitions detached and dropped (what run_retention_v1 does past the period).
        d0 = time.perf_counter()
        dropped = conn.execute(
            "select notify._drop_partitions(%s, '1970-01-01', '1970-01-01')", (day + dt.timedelta(days=1),)
        ).fetchone()[0]  # type: ignore[index]
        d1 = time.perf_counter()
        time.sleep(1)
        drop = {"ms": round((d1 - d0) * 1000, 1), "dropped": dropped, **load.window(d0, max(d1, d0 + 1.0))}
        log(f"drop partitions: {drop}")
        load.close()

        # 2. The same rows again, deleted instead (one statement per table, the fastest way to delete them).
        log("filling the same day again, to delete it")
        fill_day(conn, tenant_id, day, args.deliveries, args.events_per_delivery)
        conn.execute("analyze notify.delivery_events, notify.delivery_attempts")
        assert rows_of_day(conn, day) == rows
        load = Load(url, tenant_id)
        load.start()
        time.sleep(2)
        lo = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        hi = lo + dt.timedelta(days=1)
        x0 = time.perf_counter()
        with conn.transaction():
            conn.execute("delete from notify.delivery_events where occurred_at >= %s and occurred_at < %s", (lo, hi))
            conn.execute("delete from notify.delivery_attempts where started_at >= %s and started_at < %s", (lo, hi))
        x1 = time.perf_counter()
        delete = {"ms": round((x1 - x0) * 1000, 1), **load.window(x0, x1)}
        log(f"delete rows: {delete}")
        # The deleted rows are dead tuples until vacuumed: part of the price of deleting (a dropped partition leaves none).
        v0 = time.perf_counter()
        conn.execute("vacuum notify.delivery_events, notify.delivery_attempts")
        v1 = time.perf_counter()
        delete["vacuum_ms"] = round((v1 - v0) * 1000, 1)
        delete["vacuum"] = load.window(v0, v1)
        log(f"vacuum after the delete: {delete['vacuum_ms']} ms")
        load.close()

    figures = {
        "deliveries": args.deliveries,
        "history_rows": rows,
        "drop_ms": drop["ms"],
        "delete_ms": delete["ms"],
        "delete_over_drop": round(delete["ms"] / max(drop["ms"], 0.001), 1),
        "vacuum_after_delete_ms": delete["vacuum_ms"],
        "baseline": baseline,
        "during_drop": drop,
        "during_delete": delete,
    }
    print()
    print(f"Retention: a day of {args.deliveries:,} finished deliveries' history ({rows:,} rows)")
    print(f"  drop the day's partitions : {drop['ms']:>10,.1f} ms")
    print(f"  delete the same rows      : {delete['ms']:>10,.1f} ms   ({figures['delete_over_drop']}x the drop)")
    print(f"  then vacuum them          : {delete['vacuum_ms']:>10,.1f} ms")
    print(f"  {'':26}{'ingest/s':>10}{'slowest ms':>12}{'dispatch/s':>12}{'slowest batch ms':>18}")
    for label, w in (
        ("baseline", baseline),
        ("during the drop (1 s)", drop),
        ("during the delete", delete),
        ("during the vacuum", delete["vacuum"]),
    ):
        print(
            f"  {label:26}{w['ingest_per_s']:>10}{w['ingest_slowest_ms']:>12}"
            f"{w['dispatch_per_s']:>12}{w['dispatch_slowest_batch_ms']:>18}"
        )
    print(json.dumps(figures))
    pg.stop()


if __name__ == "__main__":
    main()
