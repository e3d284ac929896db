"""notify_api.list_callbacks_v1: every callback message of a notification with every attempt; 404 for another
tenant's or an unknown notification."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import call, intent, submit
from tests.sql.callbacks import attempt, claim_callbacks, configure, record_callbacks


def test_messages_and_their_attempts_are_listed(db, ready):
    configure(db, ready, {"url": "https://hooks.runflow.example/notify", "retry_schedule_ms": [0]})
    response, _ = submit(db, ready, intent(channels=["email"]))
    [row] = claim_callbacks(db)
    record_callbacks(db, attempt(ready, row[1], 1, "retry"))
    [listed] = call(db, "notify_api.list_callbacks_v1(%s, %s)", ready, response["id"])
    assert listed["sequence"] == 1 and listed["status"] == "pending" and listed["event"]["data"]["status"] == "queued"
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in listed["attempt_history"]] == [(1, "retry", 503)]


def test_a_notification_without_callbacks_lists_nothing(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    assert call(db, "notify_api.list_callbacks_v1(%s, %s)", ready, response["id"]) == []


def test_an_unknown_or_another_tenants_notification_is_404(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    for tenant, notification in ((ready, str(uuid.uuid4())), (other, response["id"])):
        with pytest.raises(psycopg.Error) as err:
            call(db, "notify_api.list_callbacks_v1(%s, %s)", tenant, notification)
        assert err.value.sqlstate == "ND404"
