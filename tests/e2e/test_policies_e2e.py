"""Quiet hours and frequency caps through the real processes: HTTP settings and submit -> worker claim -> held,
suppressed or sent -> mock provider -> signed webhook -> status. The clock is moved, not waited for: when a hold has
been recorded, the window is lifted and the hold's end (due_at and its scheduled wake-up) set to now."""

from __future__ import annotations

import pytest

from tests.conftest import REMINDER, Service, call, intent

pytestmark = pytest.mark.slow


def deliveries(svc: Service, notification_id: str, predicate) -> list[dict]:  # noqa: ANN001
    return svc.wait_for(notification_id, lambda body: predicate(body["deliveries"]))["deliveries"]


def test_a_delivery_held_by_quiet_hours_is_sent_when_they_end(service: Service, db) -> None:  # noqa: ANN001
    start, end = db.execute(
        "select to_char(now() at time zone 'UTC' - interval '1 hour', 'HH24:MI'),"
        " to_char(now() at time zone 'UTC' + interval '1 hour', 'HH24:MI')"
    ).fetchone()
    with service.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        put = c.put(
            "/internal/quiet-hours", json={"start": start, "end": end, "categories": {"password_reset": {"exempt": True}}}
        )
        assert put.status_code == 200, put.text
        held = c.post("/internal/notifications", json=intent(channels=["email"], category="reminder")).json()["id"]
        exempt = c.post("/internal/notifications", json=intent(channels=["email"], category="password_reset")).json()["id"]
    # The exempt one is sent at once; the other is held by the worker's claim until the window ends.
    assert deliveries(service, exempt, lambda ds: ds[0]["status"] == "delivered")
    [d] = deliveries(service, held, lambda ds: ds[0]["status"] == "held")
    assert d["reason"] == "quiet_hours"
    due_at, ends = db.execute(
        "select due_at, notify._quiet_hours_end(%s::time, %s::time, 'UTC', updated_at) from notify.notification_deliveries"
        " where id = %s",
        (start, end, d["id"]),
    ).fetchone()
    assert due_at == ends
    # The claim scheduled a wake-up at the second the hold ends.
    lock = "dispatch:email:%d" % call(db, "ceil(extract(epoch from %s::timestamptz))::bigint", ends)
    assert call(db, "(select count(*) from procrastinate_jobs where queueing_lock = %s and status = 'todo')", lock) == 1
    # The clock reaches the window's end: the window is over, the hold and its wake-up are due.
    with service.client() as c:
        assert c.delete("/internal/quiet-hours").status_code == 200
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (d["id"],))
    db.execute("update procrastinate_jobs set scheduled_at = now() where queueing_lock = %s and status = 'todo'", (lock,))
    [d] = deliveries(service, held, lambda ds: ds[0]["status"] == "delivered")
    history = [
        (r[0], r[1])
        for r in db.execute(
            "select to_status::text, reason from notify.delivery_events where delivery_id = %s order by seq", (d["id"],)
        )
    ]
    assert history[:3] == [("queued", None), ("held", "quiet_hours"), ("sending", None)]  # the hold's reason ends with it
    assert history[-1][0] == "delivered"


def test_a_frequency_cap_suppresses_the_fourth_reminder(service: Service) -> None:
    with service.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        caps = {"caps": [{"max": 3, "period": "P1D", "category": "reminder"}]}
        assert c.put("/internal/frequency-caps", json=caps).status_code == 200
        ids = []
        for _ in range(3):
            ids.append(c.post("/internal/notifications", json=intent(channels=["email"], category="reminder")).json()["id"])
            deliveries(service, ids[-1], lambda ds: ds[0]["status"] == "delivered")
        fourth = c.post("/internal/notifications", json=intent(channels=["email"], category="reminder")).json()["id"]
        other = c.post("/internal/notifications", json=intent(channels=["email"], category="news")).json()["id"]
    [d] = deliveries(service, fourth, lambda ds: ds[0]["status"] == "suppressed")
    assert d["reason"] == "frequency_cap"
    assert deliveries(service, other, lambda ds: ds[0]["status"] == "delivered")
