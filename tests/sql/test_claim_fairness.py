"""notify_api.claim_deliveries_v1's order (issue #14, "Priority and fairness"): higher priority first, and within a
priority each tenant its share (notify._claim_shares), so one tenant's backlog does not hold back another's message.

Priorities are set on the deliveries directly (the submission's `priority` field is another part of the issue)."""

from __future__ import annotations

from collections import Counter

import psycopg
from psycopg.types.json import Jsonb

from tests.conftest import app_url, call, claim, submit

PLAIN = {"locale": "en", "channels": {"email": {"subject": "Hi", "text": "Hi {{name}}"}}}


def new_tenant(db: psycopg.Connection, slug: str) -> str:
    tenant = str(call(db, "notify_api.create_tenant_v1(%s, %s, 'en')", slug, slug.title())["id"])
    call(db, "notify_api.upsert_template_v1(%s, 'plain', %s)", tenant, Jsonb(PLAIN))
    return tenant


def queue(db: psycopg.Connection, tenant: str, n: int, priority: str = "normal", prefix: str = "m", **extra: object) -> list[str]:
    """n queued e-mail deliveries of the tenant, submitted as one fan-out, then given the priority."""
    body = {
        "recipients": [{"ref": f"{prefix}-{i}", "addresses": {"email": f"{prefix}{i}@example.com"}} for i in range(n)],
        "channels": ["email"],
        "template": "plain",
        "variables": {"name": "Ana"},
        **extra,
    }
    response, _ = submit(db, tenant, body)
    ids = [
        str(i) for (i,) in db.execute("select id from notify.notification_deliveries where request_id = %s", (response["id"],))
    ]
    assert len(ids) == n
    db.execute("update notify.notification_deliveries set priority = %s where id = any(%s::uuid[])", (priority, ids))
    return ids


def by_tenant(rows: list[tuple]) -> Counter:
    return Counter(str(r[0]) for r in rows)


def priorities(db: psycopg.Connection, rows: list[tuple]) -> Counter:
    ids = [r[1] for r in rows]
    return Counter(
        p for (p,) in db.execute("select priority::text from notify.notification_deliveries where id = any(%s)", (ids,))
    )


def test_high_before_normal_before_bulk(db):
    t = new_tenant(db, "acme")
    # the bulk ones are the oldest, the high ones the newest
    queue(db, t, 4, "bulk", "b")
    queue(db, t, 4, "normal", "n")
    queue(db, t, 4, "high", "h")
    assert priorities(db, claim(db, "email", limit=3)) == {"high": 3}
    assert priorities(db, claim(db, "email", limit=3)) == {"high": 1, "normal": 2}
    assert priorities(db, claim(db, "email", limit=4)) == {"normal": 2, "bulk": 2}
    assert priorities(db, claim(db, "email", limit=10)) == {"bulk": 2}


def test_a_higher_priority_of_another_tenant_comes_first(db):
    a, b = new_tenant(db, "alpha"), new_tenant(db, "beta")
    queue(db, a, 50, "normal", "a")
    queue(db, b, 2, "high", "b")
    queue(db, b, 50, "bulk", "c")
    rows = claim(db, "email", limit=20)
    assert priorities(db, rows) == {"high": 2, "normal": 18}
    assert by_tenant(rows) == {b: 2, a: 18}


def test_a_handful_is_in_the_first_claim_behind_another_tenants_backlog(db):
    a, b = new_tenant(db, "alpha"), new_tenant(db, "beta")
    queue(db, a, 10_000, "normal", "a")
    handful = queue(db, b, 3, "normal", "b")  # queued after the whole backlog
    rows = claim(db, "email", limit=100)
    assert len(rows) == 100  # a full batch: what the handful leaves goes to the backlog
    assert {str(r[1]) for r in rows if str(r[0]) == b} == set(handful) and by_tenant(rows)[a] == 97


def test_a_bulk_backlog_does_not_hold_back_a_normal_message(db):
    a, b = new_tenant(db, "alpha"), new_tenant(db, "beta")
    queue(db, a, 10_000, "bulk", "a")
    (reset,) = queue(db, b, 1, "normal", "b")
    rows = claim(db, "email", limit=500)
    assert len(rows) == 500 and reset in {str(r[1]) for r in rows}


def test_many_tenants_share_a_claim_evenly(db):
    tenants = [new_tenant(db, f"club{i}") for i in range(20)]
    for t in tenants:
        queue(db, t, 30)
    rows = claim(db, "email", limit=100)
    assert by_tenant(rows) == {t: 5 for t in tenants}


def test_a_tenant_with_fewer_rows_than_its_share_leaves_the_rest_to_the_others(db):
    one, two, big, bigger = (new_tenant(db, s) for s in ("one", "two", "big", "bigger"))
    queue(db, big, 50, prefix="g")
    queue(db, bigger, 60, prefix="h")
    queue(db, one, 1, prefix="o")
    queue(db, two, 2, prefix="t")
    counts = by_tenant(claim(db, "email", limit=31))
    assert counts[one] == 1 and counts[two] == 2 and sorted([counts[big], counts[bigger]]) == [14, 14]
    assert sum(counts.values()) == 31  # a full batch: the 28 the small ones leave, split evenly between the large ones


def test_with_more_tenants_than_rows_each_claim_serves_others(db):
    """Fewer rows than tenants: a claim gives one row each to as many tenants as it has rows, picked afresh by every
    claim (by a hash of the tenant and the transaction's time: all of a fan-out's rows are due at the same instant, so
    "longest waiting" would pick the same tenants until they were drained)."""
    tenants = [new_tenant(db, f"club{i}") for i in range(12)]
    for t in tenants:
        queue(db, t, 50)
    seen: Counter = Counter()
    for _ in range(40):
        rows = claim(db, "email", limit=4)
        assert len(rows) == 4 and len(by_tenant(rows)) == 4
        seen.update(by_tenant(rows))
    # Each claim picks 4 of 12: a tenant left out of all 40 has a chance of (2/3)^40 (1e-7); picking by the oldest row or
    # by tenant id leaves 8 of them out every time.
    assert set(seen) == set(tenants), f"{12 - len(seen)} of 12 tenants got nothing in 40 claims"


def test_future_rows_do_not_stall_the_claim(db):
    early, late, due = new_tenant(db, "early"), new_tenant(db, "late"), new_tenant(db, "due")
    # Whatever order the tenants' ids sort in, two of them have only future rows (high and normal, before the due one).
    queue(db, early, 2_000, "high", "e", send_at="2099-01-01T00:00:00Z")
    queue(db, late, 2_000, "normal", "l", send_at="2099-01-01T00:00:00Z")
    mine = queue(db, due, 3, "normal", "d")
    rows = claim(db, "email", limit=10)
    assert {str(r[1]) for r in rows} == set(mine)
    assert claim(db, "email", limit=10) == []


def test_a_held_row_is_claimed_when_its_hold_ends(db):
    t = new_tenant(db, "acme")
    held, queued = queue(db, t, 1, prefix="h"), queue(db, t, 1, prefix="q")
    db.execute("set notify.source = 'test'")
    db.execute(
        "update notify.notification_deliveries set status = 'held', due_at = now() + interval '1 hour' where id = %s", held
    )
    assert [str(r[1]) for r in claim(db, "email")] == queued
    db.execute("update notify.notification_deliveries set due_at = now() - interval '1 second' where id = %s", held)
    assert [str(r[1]) for r in claim(db, "email")] == held


def test_concurrent_claims_get_disjoint_full_batches(db, db_url):
    a, b = new_tenant(db, "alpha"), new_tenant(db, "beta")
    queue(db, a, 300, "normal", "a")
    queue(db, b, 10, "normal", "b")
    queue(db, b, 5, "high", "h")
    url = app_url(db_url)  # the worker's role, as in production
    with psycopg.connect(url) as one, psycopg.connect(url) as two:
        first = claim(one, "email", limit=100)  # one holds its row locks: its transaction stays open
        second = claim(two, "email", limit=100)  # two skips them
        two.commit()
        one.commit()
    ids_one, ids_two = {r[1] for r in first}, {r[1] for r in second}
    assert not ids_one & ids_two
    assert len(first) == 100 and priorities(db, first)["high"] == 5 and by_tenant(first)[b] == 15
    # two found the high and beta's rows locked by one: its shares of them came back short, the rest is alpha's
    assert len(second) >= 85 and by_tenant(second) == {a: len(second)}
    assert db.execute("select count(*) from notify.delivery_attempts").fetchone()[0] == len(first) + len(second)


QUEUE_READS = """
select pg_stat_get_xact_tuples_returned('notify.notification_deliveries_due'::regclass),
       pg_stat_get_xact_blocks_fetched('notify.notification_deliveries_due'::regclass),
       (select sum(pg_stat_get_xact_blocks_fetched(c.oid)) from pg_class c
         where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'i'))::bigint
"""


def test_the_claim_reads_a_few_entries_whatever_the_other_backlogs(db, db_url):
    """Counted by Postgres for the claim's transaction, run through the worker's role (the claim is a security
    definer function under row security): a bulk backlog of 20,000 due rows and 20,000 high rows scheduled for later
    (other tenants) cost the claim of a handful a few index entries and pages, not a scan of them."""
    bulk, later, small = new_tenant(db, "bulk"), new_tenant(db, "later"), new_tenant(db, "small")
    queue(db, bulk, 10_000, "bulk", "x")
    queue(db, bulk, 10_000, "bulk", "y")
    queue(db, later, 10_000, "high", "l", send_at="2099-01-01T00:00:00Z")
    queue(db, later, 10_000, "high", "k", send_at="2099-01-01T00:00:00Z")
    mine = queue(db, small, 5, "normal", "s")
    # each row its own due time (a fan-out's rows share one, and the index would store them as one deduplicated key)
    db.execute(
        "update notify.notification_deliveries set due_at = due_at - random() * interval '1 hour' where tenant_id <> %s", (small,)
    )
    db.execute("vacuum analyze notify.notification_deliveries")
    pages = db.execute("select relpages from pg_class where oid = 'notify.notification_deliveries_due'::regclass").fetchone()[0]
    with psycopg.connect(app_url(db_url)) as worker:
        claim(worker, "email", limit=10)  # plans made, caches warm
        worker.rollback()
        before = worker.execute(QUEUE_READS).fetchone()
        rows = claim(worker, "email", limit=10)
        after = worker.execute(QUEUE_READS).fetchone()
        worker.rollback()
    assert set(mine) <= {str(r[1]) for r in rows} and len(rows) == 10
    entries, queue_pages, all_pages = (a - b for a, b in zip(after, before, strict=True))
    print(
        f"\na claim of 10 beside 40,000 other rows in a queue index of {pages} pages read {entries} of its entries "
        f"from {queue_pages} page visits ({all_pages} page visits in all notify tables and indexes)"
    )
    assert entries < 60, f"the claim read {entries} entries of the queue's index"
    assert queue_pages < 60, f"the claim visited {queue_pages} pages of the queue's index ({pages} pages)"
