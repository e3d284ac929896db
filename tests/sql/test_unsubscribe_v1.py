"""notify_api.unsubscribe_v1: an opt-out for a delivery's channel and category (RFC 8058), idempotent."""

from __future__ import annotations

from tests.conftest import call, intent, submit


def test_unsubscribe_revokes_the_category_once(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"], category="newsletter"))
    delivery = response["deliveries"][0]["id"]
    assert call(db, "notify_api.unsubscribe_v1(%s, %s)", ready, delivery)["unsubscribed"] is True
    call(db, "notify_api.unsubscribe_v1(%s, %s)", ready, delivery)
    history = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"]
    revokes = [h for h in history if h["source"] == "list_unsubscribe"]
    assert len(revokes) == 1 and revokes[0]["category"] == "newsletter"
    again, _ = submit(db, ready, intent(channels=["email"], category="newsletter"))
    other, _ = submit(db, ready, intent(channels=["email"], category="reminders"))
    assert again["deliveries"][0]["status"] == "suppressed" and other["deliveries"][0]["status"] == "queued"
