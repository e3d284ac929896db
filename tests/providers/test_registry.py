"""The one registration of provider kinds (providers/registry.py) and the one list of channels: everything derived from
them agrees with them and with the database, and the webhook route serves any registered adapter the same way."""

from __future__ import annotations

import logging
import typing
from typing import Any

import msgspec
import psycopg
import pytest
from litestar.testing import TestClient

import dispatcher_client.models as client_models
from api import schemas
from api.app import create_app
from cli.commands import parser
from dispatcher.settings import Settings
from providers import registry
from providers.base import (
    CHANNELS,
    InboundMessage,
    ParsedWebhook,
    ProviderContext,
    ProviderKind,
    ProviderSettings,
    StatusEvent,
    Webhook,
    WebhookRejected,
    WebhookRequest,
)
from tests.api.test_api import client  # noqa: F401  (fixture)
from tests.security.test_webhooks import app_settings


def db_channels(db: psycopg.Connection) -> list[str]:
    return list(db.execute("select enum_range(null::notify.channel)::text[]").fetchone()[0])


def test_the_channels_are_the_databases(db: psycopg.Connection) -> None:
    """The one Python list of channels is the enum, in its order: a channel added in SQL only (or in Python only)
    fails here."""
    assert list(CHANNELS) == db_channels(db)
    assert registry.CHANNELS is CHANNELS


def test_the_clients_channel_literal_is_the_databases(db: psycopg.Connection) -> None:
    """The client package imports nothing of the server, so it keeps its own literal: checked against the enum."""
    assert list(typing.get_args(client_models.Channel)) == db_channels(db)


def test_the_registered_kinds_are_the_databases(db: psycopg.Connection) -> None:
    """Which provider serves which channel: the Python kinds that send (providers/registry.py) and the database's rows
    (notify.provider_kinds, which channel_providers references) are the same pairs, so a kind added on one side only
    fails here."""
    python = {(k.name, c) for k in registry.KINDS.values() if k.make is not None for c in k.channels}
    database = set(db.execute("select name, channel::text from notify.provider_kinds").fetchall())
    assert python == database


def test_the_api_and_the_cli_offer_what_is_registered() -> None:
    assert typing.get_args(schemas.Channel) == CHANNELS
    assert typing.get_args(schemas.ProviderName) == registry.PROVIDERS
    assert set(registry.PROVIDERS) == {"mock", "whatsapp_cloud", "smtp", "twilio"}  # the kinds that send
    msgspec.json.decode(b'{"provider": "twilio"}', type=schemas.ProviderPut)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"provider": "sendgrid"}', type=schemas.ProviderPut)  # webhook-only: nothing to configure
    choices: dict[tuple[str, str], list[str]] = {}
    for action in parser()._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            for inner in sub._subparsers._group_actions if sub._subparsers else []:
                for leaf, cmd in inner.choices.items():
                    for a in cmd._actions:
                        if a.dest in ("channel", "provider") and a.choices:
                            choices[(f"{name} {leaf}", a.dest)] = list(a.choices)
    assert choices[("provider set", "channel")] == list(CHANNELS)
    assert choices[("provider set", "provider")] == list(registry.PROVIDERS)
    assert choices[("notifications find", "channel")] == list(CHANNELS)


def test_every_kind_is_consistent() -> None:
    routes = [hook.route for kind in registry.KINDS.values() for hook in kind.webhooks]
    assert len(routes) == len(set(routes)), "a webhook route is registered twice"
    read = set()
    for name, kind in registry.KINDS.items():
        assert kind.name == name
        assert set(kind.channels) <= set(CHANNELS), name
        assert set(kind.reads) <= set(ProviderSettings.__struct_fields__), name
        read |= set(kind.reads)
    # Every providers' setting has a kind that reads it (else it belongs elsewhere, or its reader is not registered).
    assert read == set(ProviderSettings.__struct_fields__)


def test_provider_for_builds_each_registered_sender(db_url: str) -> None:
    async def nothing(*_: Any) -> Any:
        return 0

    ctx = ProviderContext(take_tokens=nothing, record_mock=nothing, settings=ProviderSettings.of(Settings(database_url=db_url)))
    configs = {
        "mock": None,
        "whatsapp_cloud": {"settings": {"phone_number_id": "106540352242922"}, "secrets": {"access_token": "env:X"}},
        "smtp": {"settings": {"host": "smtp.example.com", "from": "a@example.com"}},
        "twilio": {"settings": {"account_sid": "AC" + "a" * 32, "from_number": "+15005550006"}},
    }
    assert set(configs) == set(registry.PROVIDERS)
    for name, config in configs.items():
        assert registry.provider_for(name, config, ctx).name == name
    test = registry.provider_for("mock", {"test": True}, ctx)
    assert test.test is True  # type: ignore[attr-defined]


def test_inbound_messages_are_encoded_as_the_databases_composite(db: psycopg.Connection) -> None:
    """InboundMessage's channel-neutral names (to, sender_user_id) are written as notify.inbound_message's columns
    (phone_number_id, user_id): what jsonb_populate_recordset in the webhook route reads."""
    columns = [
        r[0]
        for r in db.execute(
            "select attname from pg_attribute where attrelid = 'notify.inbound_message'::regclass and attnum > 0"
            " and not attisdropped order by attnum"
        )
    ]
    m = InboundMessage(to="+15005550006", sender="+34600111222", message_id="SM1", text="STOP", sender_user_id="ES.1")
    encoded = msgspec.to_builtins(m)
    assert set(encoded) == set(columns)
    row = db.execute(
        "select to_jsonb(r) from jsonb_populate_recordset(null::notify.inbound_message, %s) r",
        (msgspec.json.encode([m]).decode(),),
    ).fetchone()[0]
    assert (row["phone_number_id"], row["sender"], row["user_id"], row["text"]) == (
        "+15005550006",
        "+34600111222",
        "ES.1",
        "STOP",
    )


# --- the webhook route has no provider of its own -------------------------------------------------------------------
class KeyedFake:
    """A provider signing with each tenant's own key and over the public URL, as Twilio does: registered like any."""

    provider = "fake"
    seen: list[WebhookRequest] = []

    def key_hints(self, request: WebhookRequest) -> dict[str, Any] | None:
        if not request.url:
            raise WebhookRejected("fake webhooks need DISPATCHER_PUBLIC_URL", status=404)
        return {"account": request.headers.get("x-fake-account")}

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        self.seen.append(request)
        if request.headers.get("x-fake-signature") != "ok":
            raise WebhookRejected("bad signature")
        return ParsedWebhook(event_key="fake:1", payload={"n": 1}, events=[StatusEvent(status="delivered")])


FAKE = ProviderKind(name="fake", channels=("sms",), webhooks=(Webhook("fake", lambda s: KeyedFake(), needs_public_url=True),))


def test_a_registered_kind_is_served_by_the_route_without_a_line_of_its_own(db_url: str, monkeypatch) -> None:
    monkeypatch.setattr(registry, "KINDS", {**registry.KINDS, "fake": FAKE})
    KeyedFake.seen.clear()
    settings = app_settings(db_url, public_url="https://notify.example.com/")
    with TestClient(app=create_app(settings), raise_server_exceptions=False) as api:
        answer = api.post(
            "/public/webhooks/fake?a=1&b=%20", content=b"x=1", headers={"x-fake-account": "A", "x-fake-signature": "ok"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"stored": True, "duplicate": False}
        assert api.post("/public/webhooks/fake", content=b"", headers={"x-fake-signature": "no"}).status_code == 401
        # No GET handshake for a kind that has none.
        assert api.get("/public/webhooks/fake").status_code == 404
    [first, second] = KeyedFake.seen
    # The public URL as requested (the configured base, not the Host header), the raw query, the raw body; the keys the
    # database has for the hints (none: webhook_keys_v1 knows only Twilio's).
    assert (first.url, first.query, first.body, first.keys) == (
        "https://notify.example.com/public/webhooks/fake?a=1&b=%20",
        "a=1&b=%20",
        b"x=1",
        (),
    )
    assert second.url == "https://notify.example.com/public/webhooks/fake"


def test_without_a_public_url_a_url_signed_webhook_is_refused_clearly_never_5xx(db_url: str, caplog) -> None:
    """DISPATCHER_PUBLIC_URL unset: Twilio's (signed over the public URL) cannot be verified: 404, an error log saying
    which setting to fix, nothing stored; the other providers are served as before."""
    with TestClient(app=create_app(app_settings(db_url, public_url=None)), raise_server_exceptions=False) as api:
        with caplog.at_level(logging.WARNING, logger="api"):
            answer = api.post(
                "/public/webhooks/twilio",
                content=b"AccountSid=AC1&MessageSid=SM1&MessageStatus=delivered",
                headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": "c2lnbmVk"},
            )
        assert answer.status_code == 404 and answer.json()["type"].endswith("webhook_rejected")
        assert any(r.levelno == logging.ERROR and "DISPATCHER_PUBLIC_URL is not set" in r.getMessage() for r in caplog.records), (
            caplog.records
        )
        assert api.get("/public/webhooks/twilio").status_code == 404


def test_twilio_is_refused_at_configuration_when_the_deployment_has_no_public_url(client, db, ready) -> None:  # noqa: F811
    """Early and clear: without DISPATCHER_PUBLIC_URL (the `client` fixture's app has none) a tenant configuring SMS
    through Twilio gets 422 public_url_missing at once, and nothing is saved, instead of messages retried for ever."""
    body = {
        "provider": "twilio",
        "settings": {"account_sid": "AC" + "a" * 32, "from_number": "+15005550006"},
        "secrets": {"auth_token": "env:NOTIFY_TW_TOKEN"},
    }
    answer = client.put("/internal/channels/sms/provider", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["type"].endswith("public_url_missing") and answer.json()["field"] == "provider"
    assert db.execute("select count(*) from notify.channel_providers where provider = 'twilio'").fetchone()[0] == 0
    # The same for a failover chain (PUT .../providers), naming the entry.
    answer = client.put("/internal/channels/sms/providers", json={"providers": [{"provider": "mock"}, body]})
    assert answer.status_code == 422, answer.text
    assert answer.json()["type"].endswith("public_url_missing") and answer.json()["field"] == "providers[1].provider"
    assert db.execute("select count(*) from notify.channel_providers where channel = 'sms'").fetchone()[0] == 0
    # Other providers are configured as before.
    assert client.put("/internal/channels/sms/provider", json={"provider": "mock"}).status_code == 200
