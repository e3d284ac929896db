"""Attacks on a batch: one row's problem must stay that row's problem (issue #11 items 3 and 5).

- A provider hands out message ids another delivery already has (two tenants' Graph API fakes counting from 1):
  the batch's record must not fail on the unique index, and neither may the status webhook.
- A delivery whose lease keeps expiring (a poison that kills its batch) must not be requeued past its retry budget.
- One e-mail of an SMTP group that cannot be built must not make the others, already accepted, be sent again.
"""

from __future__ import annotations

import asyncio
import uuid

import psycopg
from psycopg.types.json import Jsonb

from providers.base import Message
from tests.conftest import app_url, call, claim, intent, record, submit
from tests.providers.test_smtp import TENANT, server, smtp  # noqa: F401 - `server` is the aiosmtpd fixture


def worker(db_url: str) -> psycopg.Connection:
    """The worker's own login (notify_service): what a real worker can do, nothing more."""
    return psycopg.connect(app_url(db_url), autocommit=True)


def sent(row: tuple, message_id: str) -> dict:
    return {
        "tenant_id": str(row[0]),
        "delivery_id": str(row[1]),
        "attempt": row[2],
        "outcome": "sent",
        "provider": "whatsapp_cloud",
        "provider_message_id": message_id,
    }


def delivery(db: psycopg.Connection, delivery_id: object) -> tuple:
    return db.execute(
        "select status::text, provider_message_id, last_error_code, attempt, reason "
        "from notify.notification_deliveries where id = %s",
        (delivery_id,),
    ).fetchone()


def test_reused_provider_message_ids_give_each_row_its_own_outcome(db, ready, db_url):
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        other,
        Jsonb({"channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    for tenant in (ready, other, ready, other):
        submit(db, tenant, intent(channels=["email"]))
    with worker(db_url) as w:
        first, *batch = claim(w, "email", 1) + claim(w, "email", 3)
        record(w, sent(first, "wamid.0"))
        # One batch: b reuses a's id, c reuses the id an earlier delivery already has.
        a, b, c = batch
        out = record(w, sent(a, "wamid.1"), sent(b, "wamid.1"), sent(c, "wamid.0"))
        assert {r[1] for r in out} == {"sent"} and all(r[2] for r in out)
        ids = {delivery(db, r[1])[1] for r in (a, b)}
        assert ids == {"wamid.1", None}
        loser = a if delivery(db, a[1])[1] is None else b
        assert delivery(db, loser[1])[:3] == ("sent", None, "duplicate_provider_message_id")
        assert delivery(db, c[1])[:3] == ("sent", None, "duplicate_provider_message_id")
        assert delivery(db, first[1])[:2] == ("sent", "wamid.0")
        history = db.execute(
            "select provider_message_id, error_code from notify.delivery_attempts where delivery_id = %s", (c[1],)
        ).fetchone()
        assert history == ("wamid.0", "duplicate_provider_message_id")  # the history keeps what the provider said

        # The provider's status report for the loser names the id the winner has: no 500, and no stolen id.
        event = {
            "tenant_id": str(loser[0]),
            "delivery_id": str(loser[1]),
            "provider_message_id": "wamid.1",
            "status": "delivered",
        }
        result = w.execute(
            "select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, '{}', "
            "array(select e from jsonb_populate_recordset(null::notify.status_event, %s) e))",
            (f"evt-{uuid.uuid4()}", Jsonb([event])),
        ).fetchone()[0]
        assert result["outcomes"][0]["outcome"] == "applied"
        assert delivery(db, loser[1])[:2] == ("delivered", None)


def test_a_report_for_an_id_two_deliveries_carry_changes_neither(db, ready, db_url):
    for _ in range(2):
        submit(db, ready, intent(channels=["email"]))
    with worker(db_url) as w:
        a, b = claim(w, "email", 2)
        record(w, {**sent(a, "esp-1"), "provider": "smtp"}, {**sent(b, "esp-1"), "provider": "sendgrid"})
        event = {"provider_message_id": "esp-1", "status": "delivered"}
        result = w.execute(
            "select notify_api.ingest_webhook_v1('sendgrid', 'evt-amb', '{}', "
            "array(select e from jsonb_populate_recordset(null::notify.status_event, %s) e))",
            (Jsonb([event]),),
        ).fetchone()[0]
    assert result["outcomes"][0]["outcome"] == "ambiguous"
    assert {delivery(db, a[1])[0], delivery(db, b[1])[0]} == {"sent"}


def test_an_expired_lease_counts_against_the_retry_budget(db, ready, db_url):
    call(db, "notify_api.set_retry_policy_v1(%s, 2, 50, 200)", ready)
    submit(db, ready, intent(channels=["email"]))
    with worker(db_url) as w:
        attempts = []
        for _ in range(5):  # a poison that kills its batch every time: claimed, never recorded, lease expires
            rows = claim(w, "email", 10, 0)
            if not rows:
                break
            attempts.append(rows[0][2])
            w.execute("select notify_api.run_maintenance_v1()")
        [row] = db.execute("select id from notify.notification_deliveries").fetchall()
    assert attempts == [1, 2]
    status, _, code, attempt, reason = delivery(db, row[0])
    assert (status, attempt, reason, code) == ("failed", 2, "retries_exhausted", "lease_expired")


def test_one_unbuildable_email_does_not_resend_the_group(server):  # noqa: F811
    def message(address: str, subject: str) -> Message:
        return Message(
            tenant_id=TENANT,
            delivery_id=uuid.uuid4(),
            attempt=1,
            channel="email",
            address=address,
            rendered={"subject": subject, "text": "Hola"},
            category=None,
        )

    good = [message(f"ok{i}@example.com", "Hola") for i in range(3)]
    tricky = [message(f"brk{i}@example.com", f"Hi{c}there") for i, c in enumerate("\v\f\x85\u2028")]
    broken = message("bad@example.com\u2028Bcc: x@example.com", "Hola")  # a header the e-mail package refuses
    messages = [good[0], *tricky, broken, *good[1:]]
    results = asyncio.run(smtp(server.port).send_many(messages))
    by_address = {m.address: r for m, r in zip(messages, results, strict=True)}
    assert all(by_address[m.address].outcome == "sent" for m in good + tricky)
    assert (by_address[broken.address].outcome, by_address[broken.address].error_code) == ("failed", "message_invalid")
    received = [r.recipients[0] for r in server.received]
    assert sorted(received) == sorted(m.address for m in good + tricky)  # each exactly once
    for r in server.received:
        if r.recipients[0].startswith("brk"):
            assert r.message["Subject"] == "Hi there"
