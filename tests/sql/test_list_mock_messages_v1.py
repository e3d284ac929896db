"""notify_api.list_mock_messages_v1: the newest messages the mock sent for a tenant, optionally for one delivery."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from runner.drainer import RECORD_MOCK
from tests.conftest import call, claim, intent, mock_message, submit


def setup(db, ready):
    submit(db, ready, intent(channels=["email"]))
    submit(db, ready, intent(channels=["email"], variables={"name": "Bo", "event": "x"}))
    a, b = claim(db, "email")
    db.execute(RECORD_MOCK, {"messages": Jsonb([mock_message(a, 1), mock_message(b, 2), mock_message(a, 3)])})
    return a, b


def test_newest_first_and_limited(db, ready):
    setup(db, ready)
    listed = call(db, "notify_api.list_mock_messages_v1(%s, null, 2)", ready)
    assert [m["provider_message_id"] for m in listed] == ["mock-3", "mock-2"]
    assert listed[0]["address"] == "ana@example.com" and listed[0]["rendered"] == {"text": "hi"}


def test_one_delivery_only(db, ready):
    a, _ = setup(db, ready)
    listed = call(db, "notify_api.list_mock_messages_v1(%s, %s, 100)", ready, a[1])
    assert [m["provider_message_id"] for m in listed] == ["mock-3", "mock-1"]


def test_another_tenant_sees_none(db, ready):
    setup(db, ready)
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    assert call(db, "notify_api.list_mock_messages_v1(%s, null, 100)", other) == []
