"""The dry run against the real thing: for each case of a table, preview a body over HTTP, then submit the same body and
let the real worker send it through the mock provider (and its signed webhooks); what the preview said must be what
happened — sent or not, on which channel, the reason, the provider, and the rendered content byte for byte against the
mock's outbox (GET /internal/mock/messages)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dispatcher import keys
from tests.conftest import REMINDER, Service, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow

PENDING = {"scheduled", "queued", "sending", "waiting"}  # a held delivery is what a case waits for
SENT = {"sent", "delivered", "read"}


@dataclass
class Case:
    name: str
    body: dict[str, Any]
    setup: Callable[[psycopg.Connection, str], None] = lambda conn, tenant: None
    test_key: bool = False
    expect: dict[str, tuple[bool, str | None]] = field(default_factory=dict)  # channel -> (sent, reason), a check of the table


def body(ref: str, **overrides: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "recipient": {"ref": ref, "addresses": {"whatsapp": "+34600111222", "email": f"{ref}@example.com"}},
        "channels": ["whatsapp", "email"],
        "template": "event_reminder",
        "variables": {"name": "Ana", "event": "Long run"},
    }
    b.update(overrides)
    return b


def consent(ref: str, channel: str, status: str) -> Callable[[psycopg.Connection, str], None]:
    def setup(conn: psycopg.Connection, tenant: str) -> None:
        call(conn, "notify_api.upsert_recipient_v1(%s, %s, '{}')", tenant, ref)
        call(
            conn,
            "notify_api.record_consent_v1(%s, %s, %s)",
            tenant,
            ref,
            Jsonb({"channel": channel, "status": status, "source": "form"}),
        )

    return setup


def template(key: str, channels: dict[str, Any], locale: str = "en") -> Callable[[psycopg.Connection, str], None]:
    def setup(conn: psycopg.Connection, tenant: str) -> None:
        call(conn, "notify_api.upsert_template_v1(%s, %s, %s)", tenant, key, Jsonb({"locale": locale, "channels": channels}))

    return setup


ROUTE = [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}]


def quiet_hours(conn: psycopg.Connection, tenant: str) -> None:
    """Quiet hours for category night only (so the other cases are not held), from an hour ago to two hours from now."""
    now = conn.execute("select now() at time zone 'UTC'").fetchone()[0]
    start, end = (now - dt.timedelta(hours=1)).strftime("%H:%M"), (now + dt.timedelta(hours=2)).strftime("%H:%M")
    call(
        conn,
        "notify_api.set_quiet_hours_v1(%s, %s)",
        tenant,
        Jsonb({"timezone": "UTC", "categories": {"night": {"start": start, "end": end}}}),
    )


def cap_reached(conn: psycopg.Connection, tenant: str) -> None:
    """At most one digest a day; the first one is sent by the worker before the case is previewed."""
    call(
        conn,
        "notify_api.set_frequency_caps_v1(%s, %s)",
        tenant,
        Jsonb({"caps": [{"max": 1, "period": "P1D", "category": "digest"}]}),
    )
    first = conn.execute(
        "select response from notify_api.submit_notification_v1(%s, %s)",
        (tenant, Jsonb(body("capped", channels=["email"], category="digest"))),
    ).fetchone()[0]
    deadline = time.monotonic() + 30
    query = "select status::text from notify.notification_deliveries where id = %s"
    while conn.execute(query, (first["deliveries"][0]["id"],)).fetchone()[0] not in SENT:
        assert time.monotonic() < deadline, "the first digest was never sent"
        time.sleep(0.1)


CASES = [
    Case(
        "consent granted",
        body("granted"),
        consent("granted", "whatsapp", "granted"),
        expect={"whatsapp": (True, None), "email": (True, None)},
    ),
    Case(
        "consent revoked",
        body("revoked"),
        consent("revoked", "email", "revoked"),
        expect={"whatsapp": (False, "no_consent"), "email": (False, "no_consent")},
    ),
    Case(
        "no address",
        body("no-address", recipient={"ref": "no-address", "addresses": {"whatsapp": "+34600111333"}}),
        consent("no-address", "whatsapp", "granted"),
        expect={"whatsapp": (True, None), "email": (False, "no_address")},
    ),
    Case(
        "locale fallback",
        body(
            "spanish",
            channels=["email"],
            recipient={"ref": "spanish", "addresses": {"email": "es@example.com"}, "locale": "es-MX"},
        ),
        template("event_reminder", {"email": {"subject": "Recordatorio: {{event}}", "text": "Hola {{name}}"}}, "es"),
        expect={"email": (True, None)},
    ),
    Case(
        "missing locale",
        body("nolocale", template="email_only"),
        template("email_only", {"email": {"subject": "s", "text": "t"}}),
    ),
    Case(
        "render failure",
        body("broken", channels=["email"], template="broken"),
        template("broken", {"email": {"subject": "s", "text": "{{ name.first.x }}"}}),
        expect={"email": (False, "render_failed")},
    ),
    Case(
        "test key",
        body("tester"),
        consent("tester", "whatsapp", "granted"),
        test_key=True,
        expect={"whatsapp": (True, None), "email": (True, None)},
    ),
    # after the route and policy helpers' checkpoints
    Case(
        "route: step 1 reaches its goal",
        {k: v for k, v in body("routed").items() if k != "channels"} | {"route": ROUTE},
        consent("routed", "whatsapp", "granted"),
        expect={"whatsapp": (True, None)},
    ),
    Case(
        "route: step 1 suppressed",
        {k: v for k, v in body("unrouted").items() if k != "channels"} | {"route": ROUTE},
        expect={"whatsapp": (False, "no_consent"), "email": (True, "step_1_suppressed")},
    ),
    Case("quiet hours", body("sleeper", channels=["email"], category="night"), lambda conn, tenant: quiet_hours(conn, tenant)),
    Case(
        "frequency cap",
        body("capped", channels=["email"], category="digest"),
        lambda conn, tenant: cap_reached(conn, tenant),
        expect={"email": (False, "frequency_cap")},
    ),
]


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path: Any) -> Iterator[tuple[Service, str]]:
    service = start_service(url_of(db), tmp_path)
    try:
        call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", service.tenant_id, Jsonb(REMINDER))
        test_key = keys.generate()
        call(
            db,
            "notify_api.create_api_key_v1(%s, 'test', %s, %s, '{submit,read}', true)",
            service.tenant_id,
            keys.display_prefix(test_key),
            keys.digest(test_key),
        )
        yield service, test_key
    finally:
        stop_service(service)


def settled(notification: dict[str, Any]) -> bool:
    """Every delivery has its outcome: none pending, but a later route step that waits after the step before it
    reached its goal (it is then not needed: it ends not_needed, or waits until the route's timer ends it)."""
    steps = {d.get("step"): d for d in notification["deliveries"]}
    return all(
        d["status"] not in PENDING
        or (d["status"] == "waiting" and steps[d["step"] - 1]["status"] in {"delivered", "read", "not_needed"})
        for d in notification["deliveries"]
    )


def outcome(delivery: dict[str, Any]) -> tuple[bool, str | None]:
    return delivery["status"] in SENT, delivery.get("reason")


def test_each_preview_says_what_the_real_submission_then_does(db: psycopg.Connection, stack: tuple[Service, str]) -> None:
    service, test_key = stack
    compared = 0
    for case in CASES:
        case.setup(db, service.tenant_id)
        with service.client(test_key if case.test_key else None) as c:
            preview = c.post("/internal/notifications/preview", json=case.body)
            assert preview.status_code == 200, (case.name, preview.text)
            answer = preview.json()
            submitted = c.post("/internal/notifications", json=case.body)
        if answer["outcome"] == "refused":
            # the submission is refused with the error the preview named
            assert submitted.status_code == answer["refused"]["status"], (case.name, submitted.text)
            problem = submitted.json()
            assert (problem["type"].rsplit(":", 1)[-1], problem.get("field"), problem["detail"]) == (
                answer["refused"]["type"],
                answer["refused"]["field"],
                answer["refused"]["detail"],
            ), case.name
            compared += 1
            continue
        assert submitted.status_code == 202, (case.name, submitted.text)
        assert answer["outcome"] == submitted.json()["status"], case.name
        notification = service.wait_for(submitted.json()["id"], settled, timeout=30)
        real = {d["channel"]: d for d in notification["deliveries"]}
        previewed = {d["channel"]: d for d in answer["deliveries"]}
        assert list(real) == list(previewed), case.name
        for channel, d in previewed.items():
            r = real[channel]
            assert d.get("step") == r.get("step"), (case.name, channel)
            if channel in case.expect:
                assert outcome(r) == case.expect[channel], (case.name, channel, r)
            if d["status"] == "waiting":
                # a later route step: sent only if the step before it does not reach its goal; the mock delivered it
                assert not d["would_send"] and d["condition"].startswith(f"only if step {d['step'] - 1} does not reach")
                assert r["status"] in ("waiting", "not_needed") and not r.get("sent_at"), (case.name, channel, r)
                compared += 1
                continue
            if (d.get("policy") or {}).get("decision") == "hold":
                # held by the policy at claim time until when the preview said it would be sent
                assert d["would_send"] and r["status"] == "held", (case.name, r)
                assert r["reason"] == d["policy"]["holds"][0]["reason"] == "quiet_hours", (case.name, r)
                assert dt.datetime.fromisoformat(r["due_at"]) == dt.datetime.fromisoformat(d["sends_at"]), (case.name, r, d)
                compared += 1
                continue
            reason = d.get("reason") or next((x["reason"] for x in d["reasons"]), None)
            assert (d["would_send"], reason) == outcome(r), (case.name, channel, d, r)
            if r["status"] in SENT:
                assert r["provider"] == d["provider"]["name"], (case.name, channel)
                assert bool(r.get("test")) == (d["provider"]["source"] == "test_key"), (case.name, channel)
                with service.client() as c:
                    [message] = c.get("/internal/mock/messages", params={"delivery_id": r["id"]}).json()
                assert message["rendered"] == d["rendered"], (case.name, channel)
            compared += 1
    assert compared == 17


def test_the_client_previews_with_typed_answers(stack: tuple[Service, str]) -> None:
    from dispatcher_client import Client, DispatcherError, Intent, Recipient

    service, _ = stack
    intent = Intent(
        recipient=Recipient(ref="client-r", addresses={"email": "c@example.com"}),
        channels=["whatsapp", "email"],
        template="event_reminder",
        variables={"name": "Ana", "event": "Long run"},
    )
    with Client(service.base_url, service.key) as nd:
        preview = nd.preview(intent)
        assert preview.preview and preview.outcome == "accepted"
        wa, email = preview.deliveries
        assert not wa.would_send and [r.reason for r in wa.reasons] == ["no_address", "no_consent"]
        assert email.would_send and email.rendered == {
            "subject": "Reminder: Long run",
            "text": "Hi Ana, see you at Long run.",
            "html": "<p>Hi Ana, see you at <b>Long run</b>.</p>",
        }
        with pytest.raises(DispatcherError) as info:
            nd.preview(Intent(recipient=Recipient(ref=""), channels=["email"], template="event_reminder"))
        assert info.value.status == 400
        assert nd.find_notifications(recipient="client-r").items == []  # nothing was written
