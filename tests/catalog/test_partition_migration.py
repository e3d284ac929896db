"""Migrations 0029 and 0031 on a populated database: the append-only tables become partitioned by day with every row
kept, each in its day's partition, the identity sequences going on, and the worker's (and the webhooks') path working on
the new tables."""

from __future__ import annotations

import datetime as dt

import psycopg
from psycopg.types.json import Jsonb

from dispatcher import schema
from tests.catalog.test_migrations import empty_db  # noqa: F401  (fixture)
from tests.conftest import RECORD, REMINDER, call, claim, intent, mock_message, result, submit
from tests.sql.callbacks import attempt, claim_callbacks, configure, record_callbacks
from tests.sql.test_state_machine import INGEST

TABLES = {
    "delivery_events": "occurred_at",
    "delivery_attempts": "started_at",
    "callback_attempts": "started_at",
    "mock_messages": "sent_at",
}


def migrate_before(url: str, number: str, tmp_path, monkeypatch) -> None:
    """Applies the migrations numbered below `number` only."""
    before = tmp_path / "migrations"
    before.mkdir()
    for p in schema.migration_files():
        if p.name < number:
            (before / p.name).write_bytes(p.read_bytes())
    landed = [line for line in schema.CHECKSUMS.read_text().splitlines(keepends=True) if line.split()[-1] < number]
    (before / "CHECKSUMS").write_text("".join(landed))
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS_DIR", before)
        m.setattr(schema, "CHECKSUMS", before / "CHECKSUMS")
        schema.migrate(url)


def test_migrating_a_populated_database_keeps_every_row_in_its_days_partition(empty_db, tmp_path, monkeypatch):  # noqa: F811
    migrate_before(empty_db, "0029", tmp_path, monkeypatch)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert (
            conn.execute("select relkind::text from pg_class where oid = 'notify.delivery_events'::regclass").fetchone()[0] == "r"
        )
        tenant = str(call(conn, "notify_api.create_tenant_v1('acme')")["id"])
        call(conn, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
        for i in range(5):
            submit(
                conn, tenant, intent(recipient={"ref": f"r{i}", "addresses": {"email": f"r{i}@example.com"}}, channels=["email"])
            )
        rows = claim(conn, "email")
        call(conn, "notify_api.record_mock_messages_v1(%s)", Jsonb([mock_message(r, n) for n, r in enumerate(rows)]))
        conn.execute(RECORD, {"results": Jsonb([result(r, "sent") for r in rows])})
        conn.execute(
            "insert into notify.callback_attempts (tenant_id, message_id, attempt, started_at, outcome) "
            "values (%s, gen_random_uuid(), 1, now() - interval '3 days', 'delivered')",
            (tenant,),
        )
        # History from earlier days, and one row far in the future (a clock gone wrong).
        conn.execute("update notify.delivery_events set occurred_at = occurred_at - interval '12 days' where seq = 1")
        conn.execute("update notify.delivery_attempts set started_at = started_at - interval '2 days'")
        conn.execute(
            "insert into notify.delivery_events (tenant_id, delivery_id, seq, to_status, source, occurred_at) "
            "values (%s, gen_random_uuid(), 1, 'queued', 'test', '2099-01-01')",
            (tenant,),
        )
        counted = {t: conn.execute(f"select count(*), max({c}) from notify.{t}").fetchone() for t, c in TABLES.items()}
        max_event = conn.execute("select max(id) from notify.delivery_events").fetchone()[0]

    assert schema.migrate(empty_db)[0] == "0029_retention_partitions"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for table, column in TABLES.items():
            assert conn.execute(f"select count(*), max({column}) from notify.{table}").fetchone() == counted[table], table
            assert (
                conn.execute("select relkind::text from pg_class where oid = %s::regclass", (f"notify.{table}",)).fetchone()[0]
                == "p"
            )
            # Every row but the far-future one sits in the daily partition named after its UTC day.
            placed = conn.execute(
                f"select tableoid::regclass::text, ({column} at time zone 'UTC')::date from notify.{table}"
            ).fetchall()
            for part, day in placed:
                expected = f"notify.{table}_default" if day >= dt.date(2099, 1, 1) else f"notify.{table}_p{day:%Y%m%d}"
                assert part == expected, (table, part, day)
        assert conn.execute("select count(*) from notify.delivery_events_default").fetchone()[0] == 1
        # The worker's path on the new tables: identities go on past the old ones, attempts recorded.
        submit(conn, tenant, intent(recipient={"ref": "new", "addresses": {"email": "new@example.com"}}, channels=["email"]))
        assert conn.execute(
            "select min(id) from notify.delivery_events where seq = 1 and source = 'submit' and id > %s", (max_event,)
        ).fetchone()[0]
        rows = claim(conn, "email")
        assert [r[1] for r in conn.execute(RECORD, {"results": Jsonb([result(r, "sent") for r in rows])})] == ["sent"]
        assert conn.execute("select count(*) from notify.delivery_attempts where outcome = 'sent'").fetchone()[0] == 6


def test_0031_partitions_webhook_payloads_and_callback_messages_keeping_dedup_and_the_outbox(empty_db, tmp_path, monkeypatch):  # noqa: F811
    migrate_before(empty_db, "0031", tmp_path, monkeypatch)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert (
            conn.execute("select relkind::text from pg_class where oid = 'notify.webhook_events'::regclass").fetchone()[0] == "r"
        )
        tenant = str(call(conn, "notify_api.create_tenant_v1('acme')")["id"])
        call(conn, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
        configure(conn, tenant)
        for i in range(3):
            submit(
                conn, tenant, intent(recipient={"ref": f"r{i}", "addresses": {"email": f"r{i}@example.com"}}, channels=["email"])
            )
        # Callback messages of earlier days (one still pending), one delivered; webhooks of earlier days.
        conn.execute(
            "update notify.callback_messages set created_at = created_at - interval '3 days'"
            " where delivery_id = (select min(delivery_id::text)::uuid from notify.callback_messages)"
        )
        conn.execute(
            "update notify.callback_messages set created_at = created_at - interval '1 day', status = 'delivered'"
            " where delivery_id = (select max(delivery_id::text)::uuid from notify.callback_messages)"
        )
        for n in range(4):
            out = conn.execute(INGEST, ("mock", f"w{n}", Jsonb({"to": "+34600111222"}), Jsonb([]))).fetchone()[0]
            assert out["stored"]
        conn.execute("update notify.webhook_events set received_at = received_at - make_interval(days => id::integer % 3)")
        counted = {
            t: conn.execute(
                f"select count(*), max({c}), string_agg(md5(x::text), ',' order by md5(x::text)) from notify.{t} x"
            ).fetchone()
            for t, c in {"webhook_events": "received_at", "callback_messages": "created_at"}.items()
        }
        max_webhook = conn.execute("select max(id) from notify.webhook_events").fetchone()[0]

    assert schema.migrate(empty_db)[0] == "0031_partition_webhooks_and_callbacks"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        for table, column in {"webhook_events": "received_at", "callback_messages": "created_at"}.items():
            got = conn.execute(
                f"select count(*), max({column}), string_agg(md5(x::text), ',' order by md5(x::text)) from notify.{table} x"
            ).fetchone()
            assert got == counted[table], table
            assert (
                conn.execute("select relkind::text from pg_class where oid = %s::regclass", (f"notify.{table}",)).fetchone()[0]
                == "p"
            )
            placed = conn.execute(
                f"select tableoid::regclass::text, ({column} at time zone 'UTC')::date from notify.{table}"
            ).fetchall()
            assert len({p for p, _ in placed}) > 1, table  # rows of several days, each in its own partition
            for part, day in placed:
                assert part == f"notify.{table}_p{day:%Y%m%d}", (table, part, day)
        # Every webhook's key came along: a duplicate of an old one is refused; a new one is stored, its id goes on.
        keys = conn.execute("select provider, event_key, received_at from notify.webhook_event_keys order by 2").fetchall()
        assert keys == conn.execute("select provider, event_key, received_at from notify.webhook_events order by 2").fetchall()
        assert conn.execute(INGEST, ("mock", "w0", Jsonb({}), Jsonb([]))).fetchone()[0]["duplicate"] is True
        fresh = conn.execute(INGEST, ("mock", "w9", Jsonb({}), Jsonb([]))).fetchone()[0]
        assert fresh["stored"] and fresh["id"] > max_webhook
        # The outbox: the pending messages are claimed and recorded, and a new change is queued once.
        claimed = claim_callbacks(conn)
        assert len(claimed) == 2
        assert record_callbacks(conn, *(attempt(tenant, c[1], c[2], "delivered", 200) for c in claimed)) == 2
        assert conn.execute("select count(*) from notify.callback_messages where status = 'delivered'").fetchone()[0] == 3
        submit(conn, tenant, intent(recipient={"ref": "new", "addresses": {"email": "new@example.com"}}, channels=["email"]))
        assert conn.execute("select count(*) from notify.callback_messages where status = 'pending'").fetchone()[0] == 1
        assert (
            conn.execute(
                "select count(*) from pg_policies where schemaname = 'notify' and tablename = 'callback_messages'"
            ).fetchone()[0]
            == 2
        )
