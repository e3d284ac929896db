"""notify_api.record_mock_messages_v1 (the worker's statement, runner.drainer.RECORD_MOCK): appends what the mock sent."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from runner.drainer import RECORD_MOCK
from tests.conftest import claim, intent, mock_message, submit


def test_every_message_is_appended_and_counted(db, ready):
    submit(db, ready, intent(channels=["email"]))
    [row] = claim(db, "email")
    assert db.execute(RECORD_MOCK, {"messages": Jsonb([mock_message(row, 1), mock_message(row, 2)])}).fetchone()[0] == 2
    stored = db.execute("select provider_message_id, attempt, channel::text from notify.mock_messages order by id").fetchall()
    assert stored == [("mock-1", 1, "email"), ("mock-2", 1, "email")]


def test_nothing_sent_is_zero(db):
    assert db.execute(RECORD_MOCK, {"messages": Jsonb([])}).fetchone()[0] == 0
