"""notify_api.run_maintenance_v1: expired leases per channel policy, deadlines, safety-net wake-ups."""

from __future__ import annotations

from tests.conftest import call, claim, intent, record, result, submit


def test_expired_leases_follow_the_channel_crash_policy(db, ready):
    submit(db, ready, intent())
    email = claim(db, "email", lease=1)[0]
    wa = claim(db, "whatsapp", lease=1)[0]
    db.execute("update notify.notification_deliveries set lease_expires_at = now() - interval '1 second'")
    db.execute("delete from procrastinate_jobs")
    out = call(db, "notify_api.run_maintenance_v1()")
    assert (out["requeued"], out["unknown"]) == (1, 1)
    states = dict(db.execute("select channel::text, status::text from notify.notification_deliveries").fetchall())
    assert states == {"email": "queued", "whatsapp": "unknown"}
    assert (
        db.execute("select outcome from notify.delivery_attempts where delivery_id = %s", (wa[1],)).fetchone()[0]
        == "lease_expired"
    )
    assert out["woken"] == ["email"]
    assert db.execute("select queueing_lock from procrastinate_jobs").fetchall() == [("dispatch:email",)]
    # The late worker's write for the whatsapp attempt still counts as evidence: unknown -> sent.
    record(db, result(wa, "sent", provider_message_id="late"))
    assert db.execute("select status::text from notify.notification_deliveries where id = %s", (wa[1],)).fetchone()[0] == "sent"
    # The email's old attempt is fenced off by the new claim.
    again = claim(db, "email")[0]
    assert again[2] == email[2] + 1


def test_waiting_deliveries_past_their_deadline_expire(db, ready):
    submit(db, ready, intent(send_at="2099-01-01T00:00:00Z", expires_at="2099-01-02T00:00:00Z"))
    db.execute("update notify.notification_deliveries set expires_at = now() - interval '1 second'")
    out = call(db, "notify_api.run_maintenance_v1()")
    assert out["expired"] == 2
    assert {r[0] for r in db.execute("select status::text from notify.notification_deliveries")} == {"expired"}


def test_nothing_to_do_changes_nothing(db, ready):
    assert call(db, "notify_api.run_maintenance_v1()") == {
        "requeued": 0,
        "unknown": 0,
        "exhausted": 0,
        "expired": 0,
        "unknown_finalized": 0,
        "policy_sends_pruned": 0,
        "woken": [],
    }
