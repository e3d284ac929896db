"""notify_api.queue_health_v1: what `dispatcher status` and the metrics show."""

from __future__ import annotations

from tests.conftest import claim, intent, record, result, submit


def health(db):
    return {(r[0], r[1]): r[2:] for r in db.execute("select * from notify_api.queue_health_v1()").fetchall()}


def test_backlog_lag_leases_and_unknowns(db, ready):
    assert health(db) == {}
    submit(db, ready, intent(channels=["email"]))
    submit(db, ready, intent(channels=["email"], send_at="2099-01-01T00:00:00Z"))
    submit(db, ready, intent(channels=["whatsapp"]))
    db.execute(
        "update notify.notification_deliveries set due_at = now() - interval '90 seconds' where channel = 'email' and status = "
        "'queued'"
    )
    wa = claim(db, "whatsapp")[0]
    h = health(db)
    due, scheduled, oldest, sending, past_due, unknown = h[("acme", "email")]
    assert (due, scheduled, sending, past_due, unknown) == (1, 1, 0, 0, 0) and 89 <= oldest <= 120
    assert h[("acme", "whatsapp")][3:] == (1, 0, 0)
    db.execute(
        "update notify.notification_deliveries set lease_expires_at = now() - interval '1 second' where status = 'sending'"
    )
    assert health(db)[("acme", "whatsapp")][4] == 1
    record(db, result(wa, "unknown"))
    assert health(db)[("acme", "whatsapp")][3:] == (0, 0, 1)
