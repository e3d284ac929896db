"""notify_api.cancel_notification_v1: only what is not claimed; per-delivery answer; race with a claim."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.conftest import call, claim, intent, record, result, submit


def test_cancel_cancels_what_is_waiting(db, ready):
    response, _ = submit(db, ready, intent(send_at="2099-01-01T00:00:00Z"))
    out = call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
    assert {(d["channel"], d["status"], d["cancelled"], d["reason"]) for d in out["deliveries"]} == {
        ("whatsapp", "cancelled", True, "cancelled"),
        ("email", "cancelled", True, "cancelled"),
    }
    assert claim(db, "email") == []


def test_cancel_says_why_it_could_not(db, ready):
    response, _ = submit(db, ready, intent())
    row = claim(db, "email")[0]
    record(db, result(row, "sent", provider_message_id="m"))
    claim(db, "whatsapp")
    out = call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
    assert {(d["channel"], d["status"], d["cancelled"], d["reason"]) for d in out["deliveries"]} == {
        ("email", "sent", False, "already_sent"),
        ("whatsapp", "sending", False, "already_sending"),
    }


def test_cancel_is_idempotent(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
    out = call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
    assert out["deliveries"][0]["cancelled"] is False and out["deliveries"][0]["reason"] == "already_cancelled"


def test_another_tenants_notification_is_not_found(db, ready):
    response, _ = submit(db, ready, intent())
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    for fn in ("cancel_notification_v1", "get_notification_v1"):
        with pytest.raises(psycopg.Error) as info:
            call(db, f"notify_api.{fn}(%s, %s)", other, response["id"])
        assert info.value.sqlstate == "ND404"
    assert call(db, "notify_api.get_notification_v1(%s, %s)", ready, response["id"])["deliveries"][0]["status"] == "queued"


@pytest.mark.parametrize("winner", ["claim", "cancel"])
def test_cancel_racing_a_claim_is_either_cancelled_or_sent_never_both(db, ready, connect, winner):
    """Two scripted connections: the first to lock the row wins; the other sees the outcome."""
    response, _ = submit(db, ready, intent(channels=["email"]))
    claimer, canceller = connect(), connect()
    outcome: dict[str, object] = {}
    if winner == "claim":
        rows = claim(claimer, "email")  # 1. claim locks and moves the row to sending
        thread = threading.Thread(
            target=lambda: outcome.update(
                cancel=call(canceller, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
            )
        )
        thread.start()  # 2. cancel waits on the row lock
        thread.join(0.3)
        assert thread.is_alive()
        claimer.commit()  # 3. claim commits
        thread.join(5)
        canceller.commit()
        assert len(rows) == 1
        assert outcome["cancel"]["deliveries"][0]["cancelled"] is False  # type: ignore[index]
        assert outcome["cancel"]["deliveries"][0]["status"] == "sending"  # type: ignore[index]
    else:
        out = call(canceller, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])  # 1. cancel locks
        thread = threading.Thread(target=lambda: outcome.update(rows=claim(claimer, "email")))
        thread.start()  # 2. claim skips the locked row
        thread.join(5)
        canceller.commit()  # 3. cancel commits
        claimer.commit()
        assert out["deliveries"][0]["cancelled"] is True
        assert outcome["rows"] == []
        assert claim(db, "email") == []
    final = db.execute("select status::text from notify.notification_deliveries").fetchone()[0]
    assert final == ("sending" if winner == "claim" else "cancelled")
