"""Status callbacks to callers: the outbox commits with the status change, messages go out in sequence order per
delivery, signed (Standard Webhooks, checked with the reference `standardwebhooks` package), retried on the tenant's
schedule while the receiver is down, every attempt visible; private and loopback targets refused (SSRF)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from standardwebhooks import Webhook

from dispatcher.callback_urls import UnsafeUrl, resolve
from providers.standard_webhooks import new_secret
from tests.conftest import REMINDER, call, free_port, intent, start_service, stop_service, submit, url_of

FAST = [0, 200, 400, 800, 800, 800, 800, 800, 800, 800, 800, 800]


def configure(db: psycopg.Connection, tenant: str, url: str | None, schedule: list[int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if schedule:
        body["retry_schedule_ms"] = schedule
    return call(db, "notify_api.set_callbacks_v1(%s, %s, %s)", tenant, Jsonb(body), new_secret())


def test_the_outbox_commits_with_the_status_change_and_only_then(db: psycopg.Connection, ready: str, connect) -> None:  # noqa: ANN001
    created = configure(db, ready, "https://hooks.runflow.example/notify")
    assert created["secret"].startswith("whsec_") and created["retry_schedule_ms"][-1] == 36_000_000
    assert sum(created["retry_schedule_ms"]) >= 86_400_000  # the default keeps trying for more than a day
    assert "secret" not in call(db, "notify_api.get_callbacks_v1(%s)", ready)
    conn = connect()
    response, _ = submit(conn, ready, intent())
    conn.rollback()  # the caller's transaction fails: no callback either
    assert db.execute("select count(*) from notify.callback_messages").fetchone()[0] == 0
    response, _ = submit(db, ready, intent(metadata={"event_id": "evt-9"}))
    rows = db.execute("select delivery_id, seq, url, payload from notify.callback_messages order by delivery_id").fetchall()
    assert len(rows) == 2 and {r[1] for r in rows} == {1}
    event = rows[0][3]
    assert event["type"] == "delivery.status_changed" and event["data"]["status"] == "queued"
    assert event["data"]["metadata"] == {"event_id": "evt-9"} and event["data"]["notification_id"] == response["id"]
    assert "+34600111222" not in json.dumps(event) and "ana@example.com" not in json.dumps(event)
    call(db, "notify_api.claim_deliveries_v1('whatsapp', 10)")  # queued -> sending: the next change, seq 2
    assert db.execute("select max(seq) from notify.callback_messages").fetchone()[0] == 2
    # A wake-up for the callbacks task was deferred in the same transactions.
    assert db.execute("select count(*) from procrastinate_jobs where task_name = 'callbacks'").fetchone()[0] >= 1


def test_a_request_may_name_its_own_url_but_only_with_callbacks_set_up(db: psycopg.Connection, ready: str) -> None:
    with pytest.raises(psycopg.Error) as err:
        submit(db, ready, intent(callback_url="https://other.example/hook"))
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "callback_url"
    configure(db, ready, None)  # a secret, no default URL
    submit(db, ready, intent(variables={"name": "Bo", "event": "x"}))
    assert db.execute("select count(*) from notify.callback_messages").fetchone()[0] == 0
    response, _ = submit(db, ready, intent(callback_url="https://other.example/hook"))
    assert {r[0] for r in db.execute("select url from notify.callback_messages")} == {"https://other.example/hook"}
    assert (
        call(db, "notify_api.get_notification_v1(%s, %s)", ready, response["id"])["callback_url"] == "https://other.example/hook"
    )
    with pytest.raises(psycopg.Error) as err:
        submit(db, ready, intent(callback_url="ftp://x.example/"))
    assert err.value.sqlstate == "ND400"


def test_claims_follow_sequence_order_and_retries_follow_the_schedule(db: psycopg.Connection, ready: str) -> None:
    configure(db, ready, "https://hooks.runflow.example/notify", [0, 60_000])
    submit(db, ready, intent(channels=["whatsapp"]))
    call(db, "notify_api.claim_deliveries_v1('whatsapp', 10)")
    claimed = db.execute("select id, payload from notify_api.claim_callbacks_v1(10)").fetchall()
    assert [c[1]["data"]["sequence"] for c in claimed] == [1]  # seq 2 waits until seq 1 is delivered or given up
    first = claimed[0][0]

    def record(message: Any, attempt: int, outcome: str, code: int | None = 503) -> None:
        call(
            db,
            "notify_api.record_callback_attempts_v1(%s)",
            Jsonb(
                [
                    {
                        "tenant_id": ready,
                        "id": str(message),
                        "attempt": attempt,
                        "started_at": "2026-01-01T00:00:00Z",
                        "status_code": code,
                        "outcome": outcome,
                    }
                ]
            ),
        )

    record(first, 1, "retry")  # schedule[1] = 0 ms: due again at once
    again = db.execute("select id, attempt from notify_api.claim_callbacks_v1(10)").fetchall()
    assert again == [(first, 2)]
    record(first, 2, "retry")  # schedule[2] = 60 s: not due now
    assert db.execute("select * from notify_api.claim_callbacks_v1(10)").fetchall() == []
    db.execute("update notify.callback_messages set next_attempt_at = now() where id = %s", (first,))
    assert db.execute("select attempt from notify_api.claim_callbacks_v1(10)").fetchall() == [(3,)]
    record(first, 3, "retry")  # the schedule is used up: failed
    status = db.execute("select status, attempts, last_error from notify.callback_messages where id = %s", (first,)).fetchone()
    assert status == ("failed", 3, "HTTP 503")
    record(first, 3, "delivered", 200)  # a stale report changes nothing
    assert db.execute("select status from notify.callback_messages where id = %s", (first,)).fetchone()[0] == "failed"
    nxt = db.execute("select payload from notify_api.claim_callbacks_v1(10)").fetchall()
    assert [n[0]["data"]["sequence"] for n in nxt] == [2]  # the next change is free to go now
    listed = call(
        db,
        "notify_api.list_callbacks_v1(%s, %s)",
        ready,
        db.execute("select notification_id from notify.callback_messages limit 1").fetchone()[0],
    )
    assert [a["outcome"] for a in listed[0]["attempt_history"]] == ["retry", "retry", "retry"]


def test_rotation_signs_with_both_secrets_during_the_overlap(db: psycopg.Connection, ready: str) -> None:
    old = configure(db, ready, "https://hooks.runflow.example/notify")["secret"]
    rotated = call(db, "notify_api.rotate_callback_secret_v1(%s, %s, 3600)", ready, new_secret())
    assert rotated["secret"] != old and rotated["previous_secret_valid_until"]
    submit(db, ready, intent(channels=["email"]))
    [(secrets,)] = db.execute("select secrets from notify_api.claim_callbacks_v1(10)").fetchall()
    assert secrets == [rotated["secret"], old]
    call(db, "notify_api.rotate_callback_secret_v1(%s, %s, 0)", ready, new_secret())
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.rotate_callback_secret_v1(%s, 'not-a-secret', 0)", ready)
    assert err.value.sqlstate == "ND422"


# SSRF: none of these may be called outside development mode (reference/reliability.md 3.2, OWASP API7).
UNSAFE = [
    "https://127.0.0.1/hook",
    "https://localhost/hook",
    "https://[::1]/hook",
    "https://10.0.0.1/hook",
    "https://172.16.5.4/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data/",
    "https://0.0.0.0/hook",
    "https://100.64.0.1/hook",
    "https://198.18.0.1/hook",
    "https://224.0.0.1/hook",
    "https://[fe80::1]/hook",
    "https://[fc00::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://127.1/hook",
    "https://2130706433/hook",
    "https://0x7f000001/hook",
    "http://hooks.example.com/hook",
    "https://user:pw@hooks.example.com/hook",
    "https://hooks.example.com/hook#frag",
    "ftp://hooks.example.com/",
    "https://[::]/hook",
    "https://255.255.255.255/hook",
]


@pytest.mark.parametrize("url", UNSAFE)
def test_private_loopback_and_reserved_targets_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        asyncio.run(resolve(url, allow_private=False))


def test_development_mode_allows_a_receiver_on_localhost() -> None:
    target = asyncio.run(resolve("http://localhost:8123/hook?x=1", allow_private=True))
    assert (
        target.url in ("http://127.0.0.1:8123/hook?x=1", "http://[::1]:8123/hook?x=1") and target.host_header == "localhost:8123"
    )
    print(f"\nSSRF: {len(UNSAFE)} of {len(UNSAFE)} private, loopback, metadata, reserved or malformed targets refused")


class Receiver:
    """A caller's callback endpoint: verifies each message with the reference Standard Webhooks library."""

    def __init__(self, secret: str) -> None:
        self.verifier = Webhook(secret)
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.answers: list[int] = []
        self.failing = True
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    event = receiver.verifier.verify(raw, {k.lower(): v for k, v in self.headers.items()})
                    status = 503 if receiver.failing else 204
                except Exception:  # noqa: BLE001 - a forged message
                    event, status = None, 401
                receiver.answers.append(status)
                if status == 204 and event is not None:
                    receiver.events.append(event)
                    receiver.ids.append(self.headers["webhook-id"])
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


def test_a_receiver_gets_every_status_change_signed_and_in_order_after_being_down(db: psycopg.Connection, tmp_path: Path) -> None:
    svc = start_service(url_of(db), tmp_path, {"DISPATCHER_DEV_MODE": "1", "DISPATCHER_MOCK_STATUS_DELAY_MS": "20"})
    receiver: Receiver | None = None
    try:
        with svc.client() as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
            assert (
                c.post(
                    "/internal/recipients/runner-42/consents", json={"channel": "whatsapp", "status": "granted", "source": "form"}
                ).status_code
                == 201
            )
            port = free_port()
            created = c.put("/internal/callbacks", json={"url": f"http://127.0.0.1:{port}/hooks", "retry_schedule_ms": FAST})
            assert created.status_code == 200, created.text
            secret = created.json()["secret"]
            assert "secret" not in c.get("/internal/callbacks").json()
            nid = c.post(
                "/internal/notifications", json=intent(metadata={"rsvp": "r-1"}), headers={"X-Request-ID": "cb-test-1"}
            ).json()["id"]
        body = svc.wait_for(nid, lambda b: {d["status"] for d in b["deliveries"]} == {"read", "delivered"})
        # The receiver was not even listening while all of that happened; now it answers 503 for a while, then 204.
        time.sleep(1.0)
        receiver = Receiver(secret)
        receiver.port = port
        receiver.start()
        time.sleep(1.5)
        receiver.failing = False
        expected = sum(len(d["events"]) for d in body["deliveries"])
        deadline = time.monotonic() + 30
        while len(receiver.events) < expected:
            assert time.monotonic() < deadline, f"{len(receiver.events)} of {expected} callbacks arrived"
            time.sleep(0.1)
        time.sleep(0.5)
        assert len(receiver.events) == expected and len(set(receiver.ids)) == expected  # each once
        for delivery in body["deliveries"]:
            got = [e["data"] for e in receiver.events if e["data"]["delivery_id"] == delivery["id"]]
            assert [g["sequence"] for g in got] == [e["seq"] for e in delivery["events"]]  # in order, none missing
            assert [g["status"] for g in got] == [e["to"] for e in delivery["events"]]
            assert all(g["metadata"] == {"rsvp": "r-1"} and g["http_request_id"] == "cb-test-1" for g in got)
        assert 503 in receiver.answers and 401 not in receiver.answers
        with svc.client() as c:
            listed = c.get(f"/internal/notifications/{nid}/callbacks").json()
        assert len(listed) == expected and all(m["status"] == "delivered" for m in listed)
        retried = [m for m in listed if m["attempts"] > 1]
        assert retried and all(m["attempt_history"][-1]["status_code"] == 204 for m in listed)
        assert any(a["error"] for m in retried for a in m["attempt_history"] if a["outcome"] == "retry")  # refused connections
        log = svc.log_text()
        assert "callback attempted" in log and secret not in log
        attempts = sum(m["attempts"] for m in listed)
        print(
            f"\ncallbacks: {expected} status changes delivered once each, in sequence order, after the receiver was down; "
            f"{attempts} attempts in all"
        )
    finally:
        stop_service(svc)
        if receiver:
            receiver.stop()


def test_registration_and_sending_refuse_private_targets_outside_development_mode(db: psycopg.Connection, tmp_path: Path) -> None:
    svc = start_service(url_of(db), tmp_path, {"DISPATCHER_MOCK_STATUS_DELAY_MS": "20"})
    hits: list[str] = []
    trap = ThreadingHTTPServer(
        ("127.0.0.1", 0),
        type(
            "Trap",
            (BaseHTTPRequestHandler,),
            {
                "do_POST": lambda self: (hits.append(self.path), self.send_response(204), self.end_headers()),
                "log_message": lambda self, *a: None,
            },
        ),
    )
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        with svc.client() as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
            for url in ("https://127.0.0.1/x", "https://169.254.169.254/latest/meta-data/", "http://hooks.example.com/x"):
                refused = c.put("/internal/callbacks", json={"url": url})
                assert refused.status_code == 422 and refused.json()["field"] == "url", refused.text
            assert c.put("/internal/callbacks", json={"url": None}).status_code == 200  # a secret, no URL yet
            refused = c.post("/internal/notifications", json=intent(callback_url="https://10.1.2.3/hook"))
            assert refused.status_code == 422 and refused.json()["field"] == "callback_url"
        # A trusted SQL caller can store any syntactically valid URL; the worker still refuses to call it.
        with psycopg.connect(svc.db_url, autocommit=True) as conn:
            response, _ = submit(
                conn, svc.tenant_id, intent(channels=["email"], callback_url=f"http://127.0.0.1:{trap.server_address[1]}/x")
            )
            deadline = time.monotonic() + 15
            while conn.execute("select count(*) from notify.callback_attempts where outcome = 'refused'").fetchone()[0] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with svc.client() as c:
            listed = c.get(f"/internal/notifications/{response['id']}/callbacks").json()
        assert listed[0]["status"] == "failed" and listed[0]["attempt_history"][0]["outcome"] == "refused"
        assert hits == []
    finally:
        stop_service(svc)
        trap.shutdown()
        trap.server_close()


def test_a_redirect_is_a_failed_attempt_and_is_not_followed() -> None:
    import uuid

    from dispatcher.settings import Settings
    from runner.callbacks import CallbackSender

    hits: list[str] = []
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0),
        type(
            "Redirect",
            (BaseHTTPRequestHandler,),
            {
                "do_POST": lambda self: (
                    hits.append(self.path),
                    self.send_response(302),
                    self.send_header("location", "/elsewhere"),
                    self.send_header("content-length", "0"),
                    self.end_headers(),
                ),
                "log_message": lambda self, *a: None,
            },
        ),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    row = {
        "tenant_id": uuid.uuid4(),
        "id": uuid.uuid4(),
        "attempt": 1,
        "url": f"http://127.0.0.1:{server.server_address[1]}/cb",
        "secrets": [new_secret()],
        "payload": {"type": "delivery.status_changed", "data": {"delivery_id": "d", "sequence": 1}},
    }

    async def post() -> dict[str, Any]:
        sender = CallbackSender(None, Settings(database_url="", dev_mode=True))
        try:
            return await sender.post(row)
        finally:
            await sender.aclose()

    try:
        result = asyncio.run(post())
    finally:
        server.shutdown()
        server.server_close()
    assert (result["outcome"], result["status_code"]) == ("retry", 302) and hits == ["/cb"]
