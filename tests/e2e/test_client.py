"""The Python client against the real service: the whole Quickstart flow (template, consent, a reminder to one runner,
a reminder to everyone with an RSVP, reading, cancelling, mock messages, callbacks verified), sync and async, and
retries that never send twice when a response is lost or a proxy answers 503."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from dispatcher_client import AsyncClient, Client, DispatcherError, FanoutRecipient, Intent, Recipient, verify_callback
from tests.conftest import Service, start_service, stop_service, url_of

pytestmark = pytest.mark.slow

TEMPLATE = {
    "whatsapp": {"name": "event_reminder", "language": "es", "parameters": ["name", "event"]},
    "email": {"subject": "Recordatorio: {{event}}", "text": "Hola {{name}}, te esperamos en {{event}}."},
}


@pytest.fixture
def svc(db: psycopg.Connection, tmp_path: Path) -> Iterator[Service]:
    service = start_service(url_of(db), tmp_path, {"DISPATCHER_DEV_MODE": "1", "DISPATCHER_MOCK_STATUS_DELAY_MS": "20"})
    yield service
    stop_service(service)


# The mock provider reports WhatsApp messages delivered and then read, e-mail delivered: "delivered" is final only for
# e-mail, or a WhatsApp delivery caught between its two reports would pass.
FINAL = {
    "whatsapp": {"read", "failed", "suppressed", "cancelled", "expired"},
    "email": {"delivered", "failed", "suppressed", "cancelled", "expired", "bounced"},
}


def wait_completed(nd: Client, notification_id: Any, timeout: float = 15.0) -> Any:
    """Until the provider's last report is in for every delivery."""
    deadline = time.monotonic() + timeout
    while True:
        n = nd.get_notification(notification_id)
        if all(d.status in FINAL[d.channel] for d in n.deliveries):
            return n
        assert time.monotonic() < deadline, n
        time.sleep(0.1)


class Inbox:
    """The caller's callback endpoint (runflow-api's), keeping raw bodies and headers to verify with the client."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                inbox.received.append((self.rfile.read(int(self.headers["content-length"])), dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/runflow/notify-events"


def test_the_quickstart_flow_through_the_client(svc: Service) -> None:
    inbox = Inbox()
    with Client(svc.base_url, svc.key) as nd:
        # Setup (admin scope): a template, WhatsApp consent, status callbacks to runflow-api.
        assert {t.channel for t in nd.upsert_template("event_reminder", TEMPLATE, locale="es")} == {"whatsapp", "email"}
        nd.upsert_template("event_reminder", TEMPLATE)  # and for the tenant's default locale (en)
        assert nd.record_consent("runner-42", channel="whatsapp", status="granted", source="signup_form").status == "granted"
        secret = nd.set_callbacks(inbox.url).secret
        assert secret and secret.startswith("whsec_") and nd.get_callbacks().secret is None

        # runflow-api use case 1: remind one runner of tomorrow's event.
        reminder = Intent(
            recipient=Recipient(
                ref="runner-42", addresses={"whatsapp": "+34600111222", "email": "ana@example.com"}, locale="es-ES"
            ),
            channels=["whatsapp", "email"],
            template="event_reminder",
            variables={"name": "Ana", "event": "Tirada larga"},
            category="reminders",
            metadata={"event_id": "evt-7"},
        )
        first = nd.submit(reminder, idempotency_key="reminder:evt-7:runner-42")
        again = nd.submit(reminder, idempotency_key="reminder:evt-7:runner-42")
        assert not first.replayed and again.replayed and again.id == first.id
        done = wait_completed(nd, first.id)
        assert {d.channel: d.status for d in done.deliveries} == {"whatsapp": "read", "email": "delivered"}
        assert [m.channel for m in nd.list_mock_messages(limit=5)] and nd.get_recipient("runner-42").locale == "es-ES"
        assert nd.list_consents("runner-42").current[0].allowed
        nd.record_consent("runner-42", channel="email", status="revoked", source="preferences", category="newsletter")
        email = next(c for c in nd.list_consents("runner-42").current if c.channel == "email")
        assert email.allowed and [(k.category, k.allowed) for k in email.categories] == [("newsletter", False)]

        # runflow-api use case 2: remind everyone with an RSVP (one intent, one key, per-runner variables).
        rsvps = [
            FanoutRecipient(ref=f"runner-{n}", addresses={"email": f"runner{n}@example.com"}, variables={"name": f"R{n}"})
            for n in range(100, 150)
        ]
        fanout = nd.submit(
            Intent(recipients=rsvps, channels=["email"], template="event_reminder", variables={"event": "10K"}),
            idempotency_key="reminder:evt-8:rsvps",
        )
        assert fanout.recipient_count == 50 and fanout.summary and fanout.summary[0].count == 50
        assert len(wait_completed(nd, fanout.id).deliveries) == 50

        # Scheduled, then cancelled; a batch; a bad request is a typed error naming the field.
        later = nd.submit(
            Intent(
                recipient=Recipient(ref="runner-42"),
                channels=["email"],
                template="event_reminder",
                variables={"name": "Ana", "event": "x"},
                send_at=dt.datetime(2099, 1, 1, tzinfo=dt.UTC),
            )
        )
        assert all(d.cancelled for d in nd.cancel(later.id).deliveries)
        batch = nd.submit_batch(
            [
                reminder,
                (
                    Intent(
                        recipient=Recipient(ref="runner-9"),
                        channels=["email"],
                        template="event_reminder",
                        variables={"name": "N", "event": "y"},
                    ),
                    "batch-key-2",
                ),
            ]
        )
        assert (batch.accepted, batch.failed) == (2, 0)
        with pytest.raises(DispatcherError) as err:
            nd.submit(Intent(recipient=Recipient(ref="runner-42"), channels=["email"], template="event_reminder", variables={}))
        assert err.value.status == 422 and err.value.field == "variables.event" and err.value.type == "missing_variables"
        with pytest.raises(DispatcherError) as err:
            nd.get_notification("00000000-0000-0000-0000-000000000000")
        assert err.value.status == 404
        assert {p.channel: p.policy for p in nd.list_channel_policies()}["whatsapp"] == "opt_in"
        assert nd.set_channel_policy("sms", "opt_in").policy == "opt_in"
        assert {p.channel for p in nd.list_channel_providers()} == {"whatsapp", "email", "sms"}

        # Status callbacks, verified with the client; in sequence order per delivery.
        expected = sum(len(d.events) for d in done.deliveries)
        deadline = time.monotonic() + 15
        while len([b for b, _ in inbox.received if str(first.id).encode() in b]) < expected:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        events = [verify_callback(body, headers, secret) for body, headers in inbox.received]
        mine = [e for e in events if e.data.notification_id == first.id]
        for delivery in done.deliveries:
            assert [e.data.sequence for e in mine if e.data.delivery_id == delivery.id] == [ev.seq for ev in delivery.events]
        assert all(e.data.metadata == {"event_id": "evt-7"} and e.webhook_id.startswith("msg_") for e in mine)
        assert len(nd.list_callbacks(first.id)) == expected
        body, headers = inbox.received[0]
        with pytest.raises(Exception, match="ignature"):
            verify_callback(body.replace(b"queued", b"failed"), headers, secret)
        rotated = nd.rotate_callback_secret(overlap_seconds=60).secret
        assert rotated and rotated != secret
    inbox.server.shutdown()
    inbox.server.server_close()


def test_the_async_client_does_the_same(svc: Service) -> None:
    async def main() -> None:
        async with AsyncClient(svc.base_url, svc.key) as nd:
            await nd.upsert_template("event_reminder", TEMPLATE)
            accepted = await nd.submit(
                Intent(
                    recipient=Recipient(ref="runner-7", addresses={"email": "r7@example.com"}),
                    channels=["email"],
                    template="event_reminder",
                    variables={"name": "R", "event": "E"},
                )
            )
            results = await asyncio.gather(*(nd.get_notification(accepted.id) for _ in range(5)))
            assert {r.id for r in results} == {accepted.id}
            with pytest.raises(DispatcherError):
                await nd.get_recipient("nobody")

    asyncio.run(main())


class LossyTransport(httpx.HTTPTransport):
    """Between the client and the real service: the first submission reaches the server but its answer is lost (a
    read timeout); the next one gets a 503 from "the proxy" without reaching it. Everything else passes through."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.headers.get("idempotency-key"), request.headers.get("x-request-id")))
        submissions = sum(1 for method, key, _ in self.seen if method == "POST" and key)
        if request.method == "POST" and request.headers.get("idempotency-key") and submissions == 2:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"type": "urn:x:unavailable", "title": "busy"})
        response = super().handle_request(request)
        if request.method == "POST" and request.headers.get("idempotency-key") and submissions == 1:
            response.read()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def test_retries_after_a_lost_answer_and_a_503_send_once(svc: Service) -> None:
    transport = LossyTransport()
    with Client(svc.base_url, svc.key, transport=transport) as nd:
        nd.upsert_template("event_reminder", TEMPLATE)
        accepted = nd.submit(
            Intent(
                recipient=Recipient(ref="runner-5", addresses={"email": "r5@example.com"}),
                channels=["email"],
                template="event_reminder",
                variables={"name": "R", "event": "E"},
            )
        )
        assert accepted.replayed  # the third try got the first one's answer
    tries = [(key, rid) for method, key, rid in transport.seen if method == "POST" and key]
    assert len(tries) == 3 and len({key for key, _ in tries}) == 1 and len({rid for _, rid in tries}) == 1
    with psycopg.connect(svc.db_url) as conn:
        assert conn.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1
        assert conn.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 1
