"""Finding notifications reads a bounded number of index entries on a tenant with many rows: every branch of
notify._find_candidates is planned with an index condition and no sequential scan (on a new database, before any
ANALYZE, and after), and a call of notify_api.find_notifications_v1 reads a few index entries and no table by a
sequential scan, counted by Postgres for the transaction (not timed), with custom and with generic plans."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit

REQUESTS = 60_000  # per tenant; two tenants


def fill(db: psycopg.Connection, tenant: str) -> None:
    """REQUESTS single-recipient requests (one e-mail delivery each) over 3,000 recipients, written directly."""
    db.execute("set session_replication_role = replica")  # no history triggers: this is bulk test data
    db.execute(
        """insert into notify.recipients (tenant_id, ref) select %s, 'bulk-' || g from generate_series(1, 3000) g""", (tenant,)
    )
    db.execute(
        """with r as (select id, row_number() over (order by ref) as n from notify.recipients where tenant_id = %(t)s),
                req as (insert into notify.notification_requests
                            (tenant_id, fingerprint, recipient_id, template_key, channels, category, metadata, created_at)
                        select %(t)s, '\\x00', r.id, 'event_reminder', '{email}', 'c' || (g %% 7),
                               jsonb_build_object('n', g::text),
                               now() - interval '30 days' + g * interval '10 s'
                          from generate_series(1, %(n)s) g join r on r.n = 1 + g %% 3000
                        returning tenant_id, id, recipient_id, created_at)
           insert into notify.notification_deliveries (tenant_id, request_id, recipient_id, channel, status, created_at)
           select tenant_id, id, recipient_id, 'email', 'delivered', created_at from req""",
        {"t": tenant, "n": REQUESTS},
    )
    db.execute("set session_replication_role = origin")


@pytest.fixture
def big(db: psycopg.Connection, ready: str) -> str:
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    fill(db, ready)
    fill(db, other)
    submit(db, ready, intent(channels=["email"]), key="needle")  # runner-42: one notification, the newest
    return ready


BRANCHES = {
    "idempotency key": ("null", "'needle'"),
    "recipient": ("%(r)s::uuid", "null"),
    "tenant": ("null", "null"),
}


def plans(db: psycopg.Connection, tenant: str) -> dict[str, str]:
    out = {}
    bulk_17 = db.execute("select id from notify.recipients where tenant_id = %s and ref = 'bulk-17'", (tenant,)).fetchone()[0]
    for name, (recipient, key) in BRANCHES.items():
        query = f"""explain select * from notify._find_candidates(%(t)s, {recipient}, {key}, null, null,
                                                               'infinity', '00000000-0000-0000-0000-000000000000', 1000)"""
        out[name] = "\n".join(r[0] for r in db.execute(query, {"t": tenant, "r": bulk_17}))
    return out


def test_every_way_to_find_uses_an_index_before_and_after_analyze(db, big):
    for when in ("new", "analyzed"):
        if when == "analyzed":
            db.execute("analyze notify.notification_requests, notify.notification_deliveries, notify.recipients")
        for name, plan in plans(db, big).items():
            print(f"\n-- {name} ({when}):\n{plan}")
            assert "Seq Scan" not in plan, (name, when, plan)
            assert "Index Cond" in plan and "Function Scan" not in plan, (name, when, plan)  # inlined, through an index
            scans = [line for line in plan.splitlines() if "Scan" in line and "One-Time Filter" not in line]
            assert scans, plan


READ = """
select coalesce(sum(seq_scan), 0), coalesce(sum(idx_tup_fetch), 0)
  from pg_stat_xact_user_tables
 where schemaname = 'notify' and relname in ('notification_requests', 'notification_deliveries', 'recipients')
"""
INDEX_TUPLES = """
select coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
  from pg_index i join pg_class c on c.oid = i.indrelid where c.relnamespace = 'notify'::regnamespace
"""
QUERIES = [
    ({"recipient": "runner-42"}, 1),
    ({"recipient": "bulk-17"}, 20),
    ({"recipient": "bulk-17", "status": "delivered", "channel": "email"}, 20),
    ({"idempotency_key": "needle"}, 1),
    ({}, 20),
    ({"template": "event_reminder", "category": "c3"}, 20),
    ({"metadata_key": "n", "metadata_value": "100"}, 0),  # not within the newest 1,000: an empty page and a cursor
    ({"created_from": "2000-01-01T00:00:00Z", "created_to": "2100-01-01T00:00:00Z", "status": "delivered"}, 20),
]


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
def test_a_find_reads_a_bounded_number_of_rows_and_no_table_scan(db, big, mode):
    db.execute(f"set plan_cache_mode = {mode}")
    for _ in range(2):  # the second round runs the cached (after five calls, possibly generic) plans
        for filters, expected in QUERIES:
            with db.transaction(force_rollback=True):
                before_idx = db.execute(INDEX_TUPLES).fetchone()[0]
                page = call(db, "notify_api.find_notifications_v1(%s, %s, null, 20)", big, Jsonb(filters))
                seq_scans, _ = db.execute(READ).fetchone()
                index_tuples = db.execute(INDEX_TUPLES).fetchone()[0] - before_idx
            assert len(page["items"]) == expected, filters
            assert seq_scans == 0, (filters, mode)
            # at most the 1,000-candidate budget, plus a few lookups per candidate (recipient ref, delivery checks)
            assert index_tuples <= 4_000, (filters, mode, index_tuples)
            print(f"\n{mode} {filters}: {index_tuples} index entries read")
