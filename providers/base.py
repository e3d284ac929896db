"""The contract between the worker and a provider, and between the webhook route and a provider adapter."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable
from uuid import UUID

import msgspec

from providers.secrets import Endpoint, Grants

Outcome = Literal["sent", "retry", "failed", "unknown", "suppressed", "bounced"]

# The channels, in the order of the database's enum notify.channel (tests/providers/test_registry.py compares them with
# enum_range(null::notify.channel)); re-exported by providers.registry, whence the API and the CLI take their choices.
# dispatcher_client/models.py keeps its own copy (the client imports nothing of the server), checked against the enum.
CHANNELS: tuple[str, ...] = ("whatsapp", "email", "sms")


class Message(msgspec.Struct, kw_only=True, frozen=True):
    """One rendered delivery, ready for a provider. `correlation_id` travels with it where the API allows."""

    tenant_id: UUID
    delivery_id: UUID
    attempt: int
    channel: str
    address: str
    rendered: dict[str, Any]
    category: str | None = None

    @property
    def correlation_id(self) -> str:
        return f"{self.tenant_id}:{self.delivery_id}"


def parse_correlation_id(value: Any) -> tuple[UUID | None, UUID | None]:
    """(tenant_id, delivery_id) from what `Message.correlation_id` wrote, as a provider hands it back; (None, None) for
    anything else (not a string, not two UUIDs joined by one colon)."""
    if isinstance(value, str) and value.count(":") == 1:
        try:
            tenant, delivery = value.split(":")
            return UUID(tenant), UUID(delivery)
        except ValueError:
            pass
    return None, None


class SendResult(msgspec.Struct, kw_only=True, frozen=True):
    """What happened to one provider call; becomes a notify.attempt_result."""

    outcome: Outcome
    provider: str
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_seconds: float | None = None
    # What the message costs as sent, when the provider knows it at send time (SMS: {encoding, segments, units}); kept
    # on the delivery (notify.attempt_result.pricing).
    pricing: dict[str, Any] | None = None
    # Known "not sent": the provider's own protocol guarantees it accepted nothing (connection refused, DNS failure,
    # connect timeout, authentication refused, a refusal before acceptance). Only then does the worker move the message
    # to the next provider of its chain in the same attempt (docs/architecture.md, "Provider failover"). Never set for
    # an ambiguous outcome (a timeout or reset after the request went out): WhatsApp and SMS never fail over on those.
    not_sent: bool = False


class StatusEvent(msgspec.Struct, kw_only=True, frozen=True):
    """A provider status report, normalized; becomes a notify.status_event. Either a status or a flag."""

    status: str | None
    tenant_id: UUID | None = None
    delivery_id: UUID | None = None
    provider_message_id: str | None = None
    occurred_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    flag: str | None = None
    user_id: str | None = None  # WhatsApp: the recipient's business-scoped user id, when the report names it
    recipient_phone: str | None = None  # the recipient's phone number as the report names it (digits), when it does
    # what the provider says the message cost (WhatsApp: pricing_model, category, billable, type)
    pricing: dict[str, Any] | None = None


class InboundMessage(msgspec.Struct, kw_only=True, frozen=True):
    """A message a recipient sent to one of the tenant's business addresses, on any channel; becomes a
    notify.inbound_message. The encoded names (`msgspec.to_builtins`, what the webhook route hands the database) are the
    composite's columns, which are older than the SMS channel: `to` is written as phone_number_id and `sender_user_id`
    as user_id (sql/010_types.sql; tests/providers/test_registry.py checks they agree)."""

    # the business address it was sent to: WhatsApp's phone_number_id (the Graph id of the number), the E.164 number an
    # SMS was sent to
    to: str = msgspec.field(name="phone_number_id")
    sender: str | None  # the sender's address (a phone number); None when only its provider-scoped user id is known
    message_id: str  # the provider's id of the message (wamid, SM... sid)
    text: str | None = None
    received_at: dt.datetime | None = None
    sender_user_id: str | None = msgspec.field(default=None, name="user_id")  # WhatsApp 2026: business-scoped user id
    # SMS through Twilio: the Messaging Service the number it was sent to belongs to (a sender pool), if any: the tenant
    # is found by it when that number is no tenant's from_number
    messaging_service_sid: str | None = None


class ParsedWebhook(msgspec.Struct, kw_only=True, frozen=True):
    """A verified webhook: its dedup key, the payload to store, its status events and inbound messages."""

    event_key: str
    payload: Any
    events: list[StatusEvent]
    inbound: list[InboundMessage] = []
    # What of a verified payload could not be applied, and why: stored with the event (webhook_events.outcomes).
    notes: list[str] = []
    # Account-level changes, normalized ({kind, ...}: notify._apply_whatsapp_update): a user's new BSUID, a template's
    # new category, the portfolio's messaging tier.
    updates: list[dict[str, Any]] = []


class ProviderSettings(msgspec.Struct, kw_only=True, frozen=True):
    """The deployment's settings a provider or a webhook adapter may read, and nothing else (no database URL, no API or
    worker knobs). Each is declared once, with its environment variable and default, in dispatcher/settings.py (group
    "providers"); the worker and the API build this view with `ProviderSettings.of(settings)`. No defaults here on
    purpose: they are Settings' (tests/test_settings.py checks that the names and types agree)."""

    mock_webhook_secret: str | None
    mock_webhook_url: str | None
    mock_latency_ms: float
    mock_failure_rate: float
    mock_status_delay_ms: float
    mock_outcomes: dict[str, str]
    mock_record: bool
    webhook_tolerance_seconds: int
    whatsapp_app_secrets: list[str]
    whatsapp_verify_token: str | None
    sendgrid_verification_key: str | None
    mailgun_signing_key: str | None
    public_url: str | None
    unsubscribe_secret: str | None

    @classmethod
    def of(cls, settings: object) -> ProviderSettings:
        """The providers' part of a Settings (any object with these attributes); a ProviderSettings as it is."""
        if isinstance(settings, cls):
            return settings
        return cls(**{name: getattr(settings, name) for name in cls.__struct_fields__})


@dataclasses.dataclass(frozen=True)
class ProviderContext:
    """What a provider may use of the worker: shared pacing, the mock outbox, the providers' settings."""

    take_tokens: Callable[[str, float, int], Awaitable[int]]
    record_mock: Callable[[list[dict[str, Any]]], Awaitable[None]]
    settings: ProviderSettings
    # Each channel's rules as the database states them ({channel: {has_read, resend_after_ambiguous, ...}}:
    # notify_api.channel_rules_v1, sql/015 notify._channel_rules), filled by the worker before its first claim.
    channel_rules: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


class ConfigurationError(Exception):
    """A webhook secret or key that cannot work (empty after its prefix, not decodable): the API refuses to start."""


def _clean(value: Any) -> Any:
    """JSON as Postgres can store it: NUL characters (which jsonb and text refuse) become U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def json_payload(body: bytes) -> tuple[Any, list[str]]:
    """A verified body as JSON to store; a body that is not JSON is kept as text, with a reason."""
    try:
        return _clean(msgspec.json.decode(body)), []
    except (msgspec.DecodeError, RecursionError):
        return {"unparsed_body": _clean(body.decode("utf-8", "replace"))}, ["payload is not JSON: stored as text"]


def body_key(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def obj(value: Any) -> dict[str, Any]:
    """A member that should be an object, or {} when a provider sent something else (a string, a list, null)."""
    return value if isinstance(value, dict) else {}


def text(value: Any, limit: int = 1000) -> str | None:
    """A member that should be a short string: a number is written out, an object or list is not a string."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    return _clean(str(value))[:limit] or None


def why(exc: BaseException) -> str:
    """A parse failure as a stored reason: the exception's type and msgspec's message (types and paths, no values)."""
    detail = str(exc)[:200] if isinstance(exc, msgspec.ValidationError) else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def salvage(body: bytes, event_key: str, parse: Callable[[Any], ParsedWebhook]) -> ParsedWebhook:
    """Runs a parser on a VERIFIED body: whatever it raises, the payload is still stored (with the reason) and the
    provider gets 200 (a 4xx or 5xx makes it retry for hours, then drop the event)."""
    payload, notes = json_payload(body)
    if notes:
        return ParsedWebhook(event_key=event_key, payload=payload, events=[], notes=notes)
    try:
        parsed = parse(payload)
    except Exception as exc:  # noqa: BLE001 - a verified payload is stored whatever the parser met
        return ParsedWebhook(event_key=event_key, payload=payload, events=[], notes=[f"not parsed: {why(exc)}"])
    return ParsedWebhook(
        event_key=parsed.event_key,
        payload=payload,
        events=parsed.events,
        inbound=parsed.inbound,
        notes=parsed.notes,
        updates=parsed.updates,
    )


class WebhookRejected(Exception):
    """Signature, timestamp or format check failed: answer 401 (or 400) and store nothing."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Provider(Protocol):
    name: str

    async def send_many(self, messages: list[Message]) -> list[SendResult]: ...

    async def aclose(self) -> None: ...


WEBHOOK_PATH = "/public/webhooks/"  # + the adapter's route name (api/routes/webhooks.py)


def webhook_url(public_url: str, route: str, query: str = "") -> str:
    """The public URL of a webhook route as a provider requests it: the configured base URL (DISPATCHER_PUBLIC_URL,
    never the Host header: a reverse proxy in front changes nothing), the path, and the raw query string if any."""
    return public_url.rstrip("/") + WEBHOOK_PATH + route + (f"?{query}" if query else "")


@dataclasses.dataclass(frozen=True)
class WebhookRequest:
    """Everything of one webhook request any adapter may need, the same for every provider.

    `headers` (names lower-cased) and `body` (the raw bytes, which signatures cover); `query`, the raw query string;
    `url`, the public URL as the provider requested it (webhook_url), None when DISPATCHER_PUBLIC_URL is unset;
    `keys`, for an adapter whose provider signs with each tenant's own secret: the key references of the tenants its
    `key_hints` named (notify_api.webhook_keys_v1: [{tenant_id, secrets, grants}]), looked up by the route."""

    headers: Mapping[str, str]
    body: bytes
    query: str = ""
    url: str | None = None
    keys: tuple[dict[str, Any], ...] = ()


class WebhookAdapter(Protocol):
    """Verifies a provider's webhook over the raw bytes and parses it. The route calls, for every provider alike,
    `key_hints` (from the unverified request: whose tenant keys to look up, or None when the deployment's own secret
    signs, e.g. a Meta app secret), looks those keys up if any, then `parse` with them in `request.keys`."""

    provider: str  # the provider name stored with each event (notify.webhook_events.provider)

    def key_hints(self, request: WebhookRequest) -> dict[str, Any] | None:
        """Whose keys to look up ({account_sid, tenant_id, number}), or None. May raise WebhookRejected."""
        ...

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        """Verifies the raw body and returns what to store; raises WebhookRejected."""
        ...


class DeploymentKeyed:
    """For adapters verified with the deployment's own secrets (settings): no tenant keys to look up."""

    def key_hints(self, request: WebhookRequest) -> dict[str, Any] | None:
        return None


@runtime_checkable
class Handshake(Protocol):
    """An adapter that also answers its provider's GET subscription check (WhatsApp's hub.challenge): the challenge to
    echo, or None when the token does not match."""

    def handshake(self, params: Mapping[str, str]) -> str | None: ...


# --- the registration of a provider kind ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """A tenant's configuration of one provider as the worker's claim hands it over (notify.channel_providers)."""

    settings: dict[str, Any]
    secrets: dict[str, str]
    grants: Grants
    test: bool = False  # the claim is a test delivery's (sent by the mock only)


@dataclasses.dataclass(frozen=True)
class Webhook:
    """One webhook route of a provider kind: POST (and GET, for a Handshake) /public/webhooks/{route}."""

    route: str
    make: Callable[[ProviderSettings], WebhookAdapter]  # may raise ConfigurationError (the API refuses to start)
    # True: its provider signs the public URL (Twilio): without DISPATCHER_PUBLIC_URL it cannot be verified.
    needs_public_url: bool = False


@dataclasses.dataclass(frozen=True)
class ProviderKind:
    """Everything the Python side knows about one provider, declared once at the bottom of its module and registered in
    providers/registry.py (KINDS). The database holds the rest (which settings and secrets a tenant must set)."""

    name: str  # notify.channel_providers.provider
    channels: tuple[str, ...]  # the channels it serves (a subset of providers.registry.CHANNELS)
    # builds a sender for one tenant's configuration; None: a kind that only receives webhooks (SendGrid, Mailgun)
    make: Callable[[ProviderConfig, ProviderContext], Provider] | None = None
    webhooks: tuple[Webhook, ...] = ()
    endpoint: Endpoint | None = None
    # the ProviderSettings fields it or its adapters read (tests/providers/test_registry.py: every field has a reader)
    reads: tuple[str, ...] = ()
    # True: sending needs DISPATCHER_PUBLIC_URL (Twilio's StatusCallback); the API logs it at start when it is unset
    needs_public_url: bool = False
