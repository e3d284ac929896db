"""notify_api.record_mock_messages_v1 (the worker's statement, runner.tasks.RECORD_MOCK): appends what the mock sent."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from runner.drainer import RECORD_MOCK
from tests.conftest import claim, intent, submit


def sent(row, n=0):
    return {
        "tenant_id": str(row[0]),
        "delivery_id": str(row[1]),
        "attempt": row[2],
        "channel": row[3],
        "address": row[4],
        "provider_message_id": f"mock-{n}",
        "rendered": {"text": "hi"},
    }


def test_every_message_is_appended_and_counted(db, ready):
    submit(db, ready, intent(channels=["email"]))
    [row] = claim(db, "email")
    assert db.execute(RECORD_MOCK, {"messages": Jsonb([sent(row, 1), sent(row, 2)])}).fetchone()[0] == 2
    stored = db.execute("select provider_message_id, attempt, channel::text from notify.mock_messages order by id").fetchall()
    assert stored == [("mock-1", 1, "email"), ("mock-2", 1, "email")]


def test_nothing_sent_is_zero(db):
    assert db.execute(RECORD_MOCK, {"messages": Jsonb([])}).fetchone()[0] == 0
