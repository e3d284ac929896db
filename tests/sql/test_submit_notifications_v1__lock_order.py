"""Concurrent multi-recipient submissions (a batch's usual items, its item-by-item items, a fan-out) naming the same
new recipients in different orders: they take their recipients in one order (by ref) and wake the worker last, so
they can only wait for each other, never deadlock (Postgres would abort one with deadlock_detected: a lost
submission). Each race is scripted with real connections: a third (and fourth) connection holds a recipient's
uncommitted insert, so each submission stops exactly where the order decides."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import intent


def item(ref: str, kind: str) -> dict[str, Any]:
    # (a ref ending in "-0" has no address: its delivery is suppressed, so its item wakes nothing)
    addresses = {} if ref.endswith("-0") else {"email": f"{ref}@example.com"}
    body = intent(recipient={"ref": ref, "addresses": addresses}, channels=["email"])
    if kind == "item":  # not a usual body (an expiry): the batch's item-by-item path
        body["expires_at"] = "2999-01-01T00:00:00Z"
    return body


def submission(kind: str, refs: list[str]) -> tuple[str, tuple]:
    if kind == "fanout":
        body = intent(channels=["email"])
        del body["recipient"]
        body["recipients"] = [{"ref": r, "addresses": {"email": f"{r}@example.com"}} for r in refs]
        return "select response from notify_api.submit_notification_v1(%s, %s)", (Jsonb(body),)
    items = [{"notification": item(r, kind)} for r in refs]
    return "select notify_api.submit_notifications_v1(%s, %s)", (Jsonb(items),)


def hold(connect, tenant: str, ref: str) -> psycopg.Connection:
    """A connection holding an uncommitted insert of the recipient: whoever inserts it next waits there."""
    conn = connect()
    conn.execute("insert into notify.recipients (tenant_id, ref) values (%s, %s)", (tenant, ref))
    return conn


def waiting(db: psycopg.Connection, pid: int) -> bool:
    return db.execute("select exists (select from pg_locks where pid = %s and not granted)", (pid,)).fetchone()[0]


class Run:
    """A submission on its own connection and thread, committed at the end; its error if it failed."""

    def __init__(self, connect, tenant: str, kind: str, refs: list[str]) -> None:
        self.conn = connect()
        self.pid = self.conn.info.backend_pid
        self.query, self.params = submission(kind, refs)
        self.tenant = tenant
        self.answer: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.answer = self.conn.execute(self.query, (self.tenant, *self.params)).fetchone()[0]
            self.conn.commit()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc
            self.conn.rollback()

    def wait_until_blocked(self, db: psycopg.Connection) -> None:
        deadline = time.monotonic() + 10
        while not waiting(db, self.pid):
            assert self.thread.is_alive(), self.error
            assert time.monotonic() < deadline, "the submission should be waiting for a lock"
            time.sleep(0.02)

    def settle(self, db: psycopg.Connection) -> None:
        """Lets time pass until it finished or waits for a lock (no sleep of a fixed length decides the test)."""
        deadline = time.monotonic() + 10
        while self.thread.is_alive() and not waiting(db, self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def recipients_of(db: psycopg.Connection, answer: dict) -> set[str]:
    ids = [i["body"]["id"] for i in answer["items"]] if "items" in answer else [answer["id"]]
    rows = db.execute(
        "select r.ref from notify.notification_deliveries d join notify.recipients r on r.id = d.recipient_id"
        " where d.request_id = any(%s::uuid[])",
        (ids,),
    ).fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize("kind", ["usual", "item", "fanout"])
def test_two_submissions_naming_new_recipients_in_opposite_orders_both_commit(db, ready, connect, kind):
    # x, m, y and y, n, x: in the order given, A takes x and waits at m, B takes y and waits at n; once m and n are
    # free, A wants y (B's) and B wants x (A's). In ref order (m, n, x, y) neither holds anything the other wants first.
    blocker_m, blocker_n = hold(connect, ready, "p-m"), hold(connect, ready, "p-n")
    a = Run(connect, ready, kind, ["p-x", "p-m", "p-y"])
    a.wait_until_blocked(db)
    b = Run(connect, ready, kind, ["p-y", "p-n", "p-x"])
    b.wait_until_blocked(db)
    blocker_m.rollback()
    a.settle(db)
    blocker_n.rollback()
    a.thread.join(15)
    b.thread.join(15)
    assert a.error is None and b.error is None, (a.error, b.error)
    assert recipients_of(db, a.answer) == {"p-x", "p-m", "p-y"}
    assert recipients_of(db, b.answer) == {"p-y", "p-n", "p-x"}
    if kind != "fanout":  # the answers keep the items' order
        for run, refs in ((a, ["p-x", "p-m", "p-y"]), (b, ["p-y", "p-n", "p-x"])):
            assert [i["index"] for i in run.answer["items"]] == [0, 1, 2]
            assert [i["outcome"] for i in run.answer["items"]] == ["accepted"] * 3
            assert [recipients_of(db, {"id": i["body"]["id"]}) for i in run.answer["items"]] == [{r} for r in refs]


def test_a_batch_wakes_the_worker_after_every_item_not_between_them(db, ready, connect):
    # Item by item, a wake-up between two items is a lock held while the next item's recipient is taken: A wakes e-mail
    # after p-a and then wants p-b-0, which B holds (its item suppressed: no wake-up) while it waits at p-c; B then
    # wakes e-mail after p-c, which A holds. The wake-ups come last, after every item.
    blocker_c = hold(connect, ready, "p-c")
    b = Run(connect, ready, "item", ["p-b-0", "p-c"])
    b.wait_until_blocked(db)  # B holds p-b-0, waits at p-c
    a = Run(connect, ready, "item", ["p-a", "p-b-0"])
    a.wait_until_blocked(db)  # A holds p-a (and, if woken in between, e-mail's wake-up), waits at p-b-0
    blocker_c.rollback()
    a.thread.join(15)
    b.thread.join(15)
    assert a.error is None and b.error is None, (a.error, b.error)
    assert recipients_of(db, a.answer) == {"p-a", "p-b-0"} and recipients_of(db, b.answer) == {"p-b-0", "p-c"}
    assert db.execute("select count(*) from procrastinate_jobs where queueing_lock = 'dispatch:email'").fetchone()[0] == 1
