"""The WhatsApp Cloud API provider against the Graph API fake over a real socket, and its webhook parsing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from dispatcher.settings import Settings
from providers.base import Message, ProviderContext, ProviderSettings, WebhookRejected, WebhookRequest
from providers.secrets import Grants
from providers.whatsapp import NAME, WhatsAppCloud, WhatsAppWebhooks, classify, request_body, verify_handshake
from tests.conftest import call
from tests.fakes.graph_api import GraphFake

TENANT = uuid.uuid4()
LOCAL = Grants(env_prefix="TEST_", private_endpoints=True)  # the operator's grant for the Graph API fake on this machine


@pytest.fixture
def graph() -> Iterator[GraphFake]:
    fake = GraphFake()
    fake.base_url = fake.start()  # type: ignore[attr-defined]
    yield fake
    fake.stop()


@pytest.fixture
def ctx(db_url: str) -> ProviderContext:
    """Pacing through the real take_tokens_v1 of a test database."""

    async def take(key: str, rate: float, wanted: int) -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            row = await (await conn.execute("select notify_api.take_tokens_v1(%s, %s, %s)", (key, rate, wanted))).fetchone()
            return int(row[0])  # type: ignore[index]

    async def no_mock(rows: list) -> None:
        raise AssertionError("not the mock")

    return ProviderContext(take_tokens=take, record_mock=no_mock, settings=ProviderSettings.of(Settings(database_url=db_url)))


def provider(graph: GraphFake, ctx: ProviderContext, monkeypatch: pytest.MonkeyPatch, **settings: object) -> WhatsAppCloud:
    monkeypatch.setenv("TEST_WA_TOKEN", graph.access_token)
    base = {
        "phone_number_id": graph.phone_number_id,
        "base_url": graph.base_url,
        "api_version": "v22.0",  # type: ignore[attr-defined]
        "rate_per_second": 80,
        "timeout_seconds": 2,
    }
    return WhatsAppCloud({**base, **settings}, {"access_token": "env:TEST_WA_TOKEN"}, ctx, LOCAL)


def message(to: str = "+34600111222", **rendered: object) -> Message:
    content = rendered or {"template": "event_reminder", "language": "es", "parameters": ["Ana", "Tirada larga"]}
    return Message(tenant_id=TENANT, delivery_id=uuid.uuid4(), attempt=1, channel="whatsapp", address=to, rendered=content)


def send(p: WhatsAppCloud, *messages: Message) -> list:
    async def run() -> list:
        try:
            return await p.send_many(list(messages))
        finally:
            await p.aclose()

    return asyncio.run(run())


def test_a_template_message_is_sent_as_meta_expects(graph, ctx, monkeypatch):
    m = message()
    [result] = send(provider(graph, ctx, monkeypatch), m)
    assert result.outcome == "sent" and result.provider_message_id == "wamid.fake-1"
    [req] = graph.requests
    assert req["path"] == f"/v22.0/{graph.phone_number_id}/messages"
    assert req["authorization"] == f"Bearer {graph.access_token}"
    assert req["body"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "34600111222",
        "biz_opaque_callback_data": f"{TENANT}:{m.delivery_id}",
        "type": "template",
        "template": {
            "name": "event_reminder",
            "language": {"code": "es"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "Tirada larga"}]}
            ],
        },
    }


def test_free_form_text_body():
    body = request_body(message(text="Hola"))
    assert body["type"] == "text" and body["text"] == {"preview_url": False, "body": "Hola"}


@pytest.mark.parametrize(
    ("script", "outcome", "code"),
    [
        ("error:130429", "retry", "whatsapp_130429"),
        ("error:131056", "retry", "whatsapp_131056"),
        ("error:131047", "failed", "whatsapp_131047"),
        ("error:131026", "failed", "whatsapp_131026"),
        ("error:132001", "failed", "whatsapp_132001"),
        ("error:131050", "suppressed", "whatsapp_131050"),
        ("error:131000", "retry", "whatsapp_131000"),
        ("http500", "unknown", "http_500"),
        ("timeout", "unknown", "no_response"),
    ],
)
def test_errors_are_classified_by_metas_code(graph, ctx, monkeypatch, script, outcome, code):
    graph.scripts["34600111222"] = [script]
    [result] = send(provider(graph, ctx, monkeypatch), message())
    assert (result.outcome, result.error_code) == (outcome, code)
    assert result.provider == NAME


def test_throttling_sets_a_retry_after():
    assert classify(131056, "pair rate", 400).retry_after_seconds == 6.0
    assert classify(130429, "rate", 400).retry_after_seconds == 1.0
    assert classify(190, "token expired", 401).outcome == "retry"


def test_a_bad_token_is_kept_for_retry_not_failed(graph, ctx, monkeypatch):
    p = provider(graph, ctx, monkeypatch)
    monkeypatch.setenv("TEST_WA_TOKEN", "expired")
    [result] = send(p, message())
    assert (result.outcome, result.error_code) == ("retry", "whatsapp_190")


def test_an_unreachable_api_is_retried(ctx, monkeypatch):
    monkeypatch.setenv("TEST_WA_TOKEN", "t")
    p = WhatsAppCloud(
        {"phone_number_id": "123456", "base_url": "http://127.0.0.1:1", "timeout_seconds": 1},
        {"access_token": "env:TEST_WA_TOKEN"},
        ctx,
        LOCAL,
    )
    [result] = send(p, message())
    assert (result.outcome, result.error_code) == ("retry", "connect_failed")


def test_pacing_holds_the_shared_budget(graph, ctx, monkeypatch, db):
    """With 5 messages/s and 12 messages, the shared bucket for the number is drawn down and the sends wait for it."""
    results = send(provider(graph, ctx, monkeypatch, rate_per_second=5), *[message(f"+3460011{i:04d}") for i in range(12)])
    assert [r.outcome for r in results] == ["sent"] * 12
    assert len(graph.requests) == 12
    tokens = db.execute(
        "select tokens from notify.rate_buckets where key = %s", (f"whatsapp:{graph.phone_number_id}",)
    ).fetchone()[0]
    assert tokens < 5


def test_take_tokens_grants_at_most_the_rate(db):
    assert call(db, "notify_api.take_tokens_v1('k', 10, 100)") == 10
    assert call(db, "notify_api.take_tokens_v1('k', 10, 100)") == 0
    db.execute("update notify.rate_buckets set updated_at = updated_at - interval '0.5 second'")
    assert 4 <= call(db, "notify_api.take_tokens_v1('k', 10, 100)") <= 6
    assert call(db, "notify_api.take_tokens_v1('other', 3, 2)") == 2


# --- webhooks --------------------------------------------------------------------------------------------

SECRET = "app-secret-1"


def signed(payload: dict, secret: str = SECRET) -> tuple[dict, bytes]:
    raw = json.dumps(payload).encode()
    return {"x-hub-signature-256": "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()}, raw


def envelope(**value: object) -> dict:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "W",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "1555", "phone_number_id": "106540352242922"},
                            **value,
                        },
                    }
                ],
            }
        ],
    }


def test_statuses_and_inbound_messages_are_normalized():
    delivery = uuid.uuid4()
    payload = envelope(
        statuses=[
            {
                "id": "wamid.1",
                "status": "delivered",
                "timestamp": "1698266945",
                "recipient_id": "34600111222",
                "biz_opaque_callback_data": f"{TENANT}:{delivery}",
                "pricing": {"billable": True},
            },
            {
                "id": "wamid.2",
                "status": "failed",
                "timestamp": "1698266946",
                "recipient_id": "1",
                "errors": [{"code": 131026, "title": "Message undeliverable"}],
            },
            {
                "id": "wamid.3",
                "status": "failed",
                "timestamp": "1698266946",
                "recipient_id": "1",
                "errors": [{"code": 131050, "title": "stopped marketing"}],
            },
        ],
        contacts=[{"profile": {"name": "Ana"}, "wa_id": "34600111222"}],
        messages=[{"from": "34600111222", "id": "wamid.in", "timestamp": "1698266947", "type": "text", "text": {"body": "BAJA"}}],
    )
    headers, raw = signed(payload)
    parsed = WhatsAppWebhooks([SECRET]).parse(WebhookRequest(headers, raw))
    first, second, third = parsed.events
    assert (first.status, first.delivery_id, first.tenant_id, first.provider_message_id) == (
        "delivered",
        delivery,
        TENANT,
        "wamid.1",
    )
    assert first.occurred_at.timestamp() == 1698266945
    assert (second.status, second.error_code, second.error_message) == ("failed", "whatsapp_131026", "Message undeliverable")
    assert third.status == "suppressed"
    [inbound] = parsed.inbound
    assert (inbound.to, inbound.sender, inbound.text) == ("106540352242922", "34600111222", "BAJA")
    assert parsed.event_key == "sha256:" + hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("tamper", ["forged", "truncated", "wrong_secret", "reserialized", "missing", "sha1"])
def test_bad_signatures_are_refused(tamper):
    headers, raw = signed(envelope(statuses=[]))
    if tamper == "forged":
        headers["x-hub-signature-256"] = "sha256=" + "0" * 64
    elif tamper == "truncated":
        raw = raw[:-3]
    elif tamper == "wrong_secret":
        headers, raw = signed(envelope(statuses=[]), "another-secret")
    elif tamper == "reserialized":
        raw = json.dumps(json.loads(raw), indent=1).encode()
    elif tamper == "missing":
        headers = {}
    elif tamper == "sha1":
        headers = {"x-hub-signature": "sha1=abc"}
    with pytest.raises(WebhookRejected) as info:
        WhatsAppWebhooks([SECRET]).parse(WebhookRequest(headers, raw))
    assert info.value.status == 401


def test_any_configured_app_secret_verifies():
    headers, raw = signed(envelope(statuses=[]), "second-app")
    assert WhatsAppWebhooks([SECRET, "second-app"]).parse(WebhookRequest(headers, raw)).events == []


def test_a_verified_but_malformed_payload_is_kept_not_refused():
    # A refusal makes Meta retry for days; a verified payload is stored, with nothing to apply.
    headers, raw = signed({"not": "whatsapp"})
    parsed = WhatsAppWebhooks([SECRET]).parse(WebhookRequest(headers, raw))
    assert parsed.payload == {"not": "whatsapp"} and parsed.events == [] and parsed.inbound == []


def test_the_verification_handshake():
    params = {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "1158201444"}
    assert verify_handshake(params, "vt") == "1158201444"
    assert verify_handshake({**params, "hub.verify_token": "nope"}, "vt") is None
    assert verify_handshake({**params, "hub.mode": "unsubscribe"}, "vt") is None
    assert verify_handshake(params, None) is None


def test_header_body_and_button_parameters_are_mapped_from_variables(db, tenant):
    from psycopg.types.json import Jsonb

    from runner.render import render

    content = {
        "name": "event_update",
        "language": "es",
        "header_parameters": ["club"],
        "parameters": ["name"],
        "buttons": [
            {"sub_type": "url", "index": 0, "parameter": "event_id"},
            {"sub_type": "quick_reply", "index": 1, "parameter": "rsvp"},
        ],
    }
    out = call(db, "notify_api.upsert_template_v1(%s, 'upd', %s)", tenant, Jsonb({"channels": {"whatsapp": content}}))
    assert out[0]["required_variables"] == ["club", "event_id", "name", "rsvp"]
    rendered = render("whatsapp", content, {"club": "RunFlow", "name": "Ana", "event_id": 42, "rsvp": "RSVP-42"})
    body = request_body(message(**rendered))
    assert body["template"]["components"] == [
        {"type": "header", "parameters": [{"type": "text", "text": "RunFlow"}]},
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"}]},
        {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "42"}]},
        {"type": "button", "sub_type": "quick_reply", "index": "1", "parameters": [{"type": "payload", "payload": "RSVP-42"}]},
    ]
    with pytest.raises(psycopg.Error) as info:
        call(
            db,
            "notify_api.upsert_template_v1(%s, 'bad', %s)",
            tenant,
            Jsonb({"channels": {"whatsapp": {**content, "buttons": [{"sub_type": "call", "index": 0, "parameter": "x"}]}}}),
        )
    assert info.value.diag.column_name == "channels.whatsapp.buttons"
