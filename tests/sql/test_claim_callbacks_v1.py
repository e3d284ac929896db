"""notify_api.claim_callbacks_v1 (the worker's statement, runner.callbacks.CLAIM): due messages, one lease each, in
sequence order per delivery, with the secrets to sign them."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import claim, intent, submit
from tests.sql.callbacks import URL, claim_callbacks, configure


def test_a_due_message_is_claimed_once_with_a_lease_and_its_secret(db, ready):
    secret = configure(db, ready)["secret"]
    submit(db, ready, intent(channels=["email"]))
    [row] = claim_callbacks(db)
    assert str(row[0]) == ready and row[2] == 1 and row[3] == URL and row[5] == [secret]
    assert row[4]["data"]["status"] == "queued"
    assert claim_callbacks(db) == []  # leased: not claimed again
    status = db.execute("select status, attempts, lease_expires_at > now() from notify.callback_messages").fetchone()
    assert status == ("sending", 1, True)


def test_a_later_change_waits_for_the_earlier_one(db, ready):
    configure(db, ready)
    submit(db, ready, intent(channels=["whatsapp"]))
    claim(db, "whatsapp")  # queued -> sending: sequence 2
    assert [r[4]["data"]["sequence"] for r in claim_callbacks(db)] == [1]
    assert claim_callbacks(db) == []


def test_an_expired_lease_is_claimed_again(db, ready):
    configure(db, ready)
    submit(db, ready, intent(channels=["email"]))
    assert len(claim_callbacks(db, lease=0)) == 1
    db.execute("update notify.callback_messages set lease_expires_at = now() - interval '1 second'")
    assert [r[2] for r in claim_callbacks(db)] == [2]


def test_the_limit_is_respected_and_checked(db, ready):
    configure(db, ready)
    for n in range(3):
        submit(db, ready, intent(channels=["email"], variables={"name": f"n{n}", "event": "x"}))
    assert len(claim_callbacks(db, limit=2)) == 2
    for limit in (0, 1001):
        with pytest.raises(psycopg.Error) as err:
            claim_callbacks(db, limit=limit)
        assert err.value.sqlstate == "ND400" and err.value.diag.column_name == "limit"
