"""Concurrent submissions with one Idempotency-Key: the unique index serializes them; one request results."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg

from tests.conftest import intent, submit


def test_the_loser_waits_for_the_winner_then_replays_it(db, ready, connect):
    a, b = connect(), connect()
    first, replayed = submit(a, ready, intent(), "race-1")  # 1. A inserts the key, does not commit yet
    assert not replayed
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(b=submit(b, ready, intent(), "race-1")))
    thread.start()  # 2. B blocks on A's unique-index entry
    thread.join(0.5)
    assert thread.is_alive(), "B must wait for A"
    a.commit()  # 3. A commits
    thread.join(5)
    b.commit()
    assert outcome["b"] == (first, True)  # 4. B replays A's response
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 2


def test_if_the_winner_rolls_back_the_loser_creates_it(db, ready, connect):
    a, b = connect(), connect()
    submit(a, ready, intent(), "race-2")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(b=submit(b, ready, intent(), "race-2")))
    thread.start()
    thread.join(0.5)
    a.rollback()  # A's business transaction failed
    thread.join(5)
    b.commit()
    response, replayed = outcome["b"]
    assert not replayed and response["status"] == "accepted"
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1


def test_twenty_concurrent_clients_make_one_request(db, ready, db_url):
    def one(_: int) -> tuple[dict, bool]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return submit(conn, ready, intent(), "race-3")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert len({r[0]["id"] for r in results}) == 1
    assert sum(1 for r in results if not r[1]) == 1
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 2
