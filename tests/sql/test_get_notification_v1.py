"""notify_api.get_notification_v1: a notification with every delivery's status, attempts and history; 404 for another
tenant's id."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call, claim, intent, record, result, submit


def test_every_delivery_is_shown_with_its_attempts_and_history(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    [row] = claim(db, "email")
    record(db, result(row, "sent", provider_message_id="m-1"))
    shown = call(db, "notify_api.get_notification_v1(%s, %s)", ready, response["id"])
    assert shown["id"] == response["id"]
    [delivery] = shown["deliveries"]
    assert delivery["status"] == "sent" and delivery["attempts"] == 1 and delivery["provider_message_id"] == "m-1"
    assert [e["to"] for e in delivery["events"]] == ["queued", "sending", "sent"]
    assert [(a["attempt"], a["outcome"]) for a in delivery["attempt_history"]] == [(1, "sent")]


def test_another_tenants_or_an_unknown_id_is_404(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    for tenant, notification in ((other, response["id"]), (ready, "00000000-0000-0000-0000-000000000000")):
        with pytest.raises(psycopg.Error) as err:
            call(db, "notify_api.get_notification_v1(%s, %s)", tenant, notification)
        assert err.value.sqlstate == "ND404"
