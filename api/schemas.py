"""Request and response shapes (msgspec). They document the API and reject bad shapes early;
the SQL functions check the same rules again for direct SQL callers and own the semantic ones."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import Meta

from providers.registry import CHANNELS, PROVIDERS


class Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    pass


# The channels and the providers a tenant may configure, from the one registration (providers/registry.py).
Channel = Literal[CHANNELS]  # type: ignore[valid-type]
ProviderName = Literal[PROVIDERS]  # type: ignore[valid-type]
Ref = Annotated[str, Meta(min_length=1, max_length=200)]
Locale = Annotated[str, Meta(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$", max_length=35)]


class Addresses(Base):
    # a phone number (E.164) or a business-scoped user id (BSUID, e.g. US.13491208655302741918)
    whatsapp: Annotated[str, Meta(max_length=140, examples=["+34600111222"])] | None = None
    email: Annotated[str, Meta(max_length=254, examples=["ana@example.com"])] | None = None
    sms: Annotated[str, Meta(max_length=32)] | None = None


class RecipientIn(Base):
    ref: Ref
    addresses: Addresses | None = None
    locale: Locale | None = None
    timezone: Annotated[str, Meta(max_length=64)] | None = None


class FanoutRecipient(Base):
    ref: Ref
    addresses: Addresses | None = None
    locale: Locale | None = None
    timezone: Annotated[str, Meta(max_length=64)] | None = None
    variables: dict[str, Any] | None = None


class RouteStep(Base):
    """One step of a fallback route: its channel; the status that makes the later steps unnecessary (`until`, default
    delivered); how long after it is sent it may take to reach it before the next step is sent (`within`, an ISO 8601
    duration such as PT15M; none on the last step). The database checks them again and names the field it refuses."""

    channel: Channel
    until: Literal["sent", "delivered", "read"] | None = None
    within: Annotated[str, Meta(max_length=40, examples=["PT15M"])] | None = None


Priority = Literal["high", "normal", "bulk"]


class NotificationIn(Base):
    """One intent: either `recipient` (one) or `recipients` (a fan-out of up to 10,000, each with optional variables);
    either `channels` (every one sent) or `route` (a fallback: the next step only when the one before cannot succeed or
    has not reached its goal in time)."""

    template: Annotated[str, Meta(min_length=1, max_length=100)]
    channels: Annotated[list[Channel], Meta(min_length=1, max_length=len(CHANNELS))] | None = None
    route: Annotated[list[RouteStep], Meta(min_length=1, max_length=len(CHANNELS))] | None = None
    priority: Priority | None = None
    recipient: RecipientIn | None = None
    recipients: Annotated[list[FanoutRecipient], Meta(min_length=1, max_length=10_000)] | None = None
    variables: dict[str, Any] | None = None
    category: Annotated[str, Meta(max_length=100)] | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    metadata: dict[str, Any] | None = None
    # Where this request's status callbacks go instead of the tenant's URL (callbacks must be set up first).
    callback_url: Annotated[str, Meta(min_length=8, max_length=2000)] | None = None


class DeliverySummary(Base):
    id: UUID
    channel: Channel
    status: str
    reason: str | None = None
    step: int | None = None  # its place in the request's route, when it has one


class DeliveryCount(Base):
    channel: Channel
    status: str
    count: int
    reason: str | None = None


class NotificationAccepted(Base):
    """For one recipient: `deliveries`, one per channel. For a fan-out: `recipient_count` and a `summary` of the
    deliveries by channel, status and reason (read them with GET /internal/notifications/{id})."""

    id: UUID
    status: Literal["accepted", "suppressed"]
    created_at: dt.datetime
    deliveries: list[DeliverySummary] | None = None
    recipient_count: int | None = None
    summary: list[DeliveryCount] | None = None
    test: bool | None = None  # true: submitted with a test key (sent by the mock provider only)


class BatchItem(Base):
    notification: NotificationIn
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=255)] | None = None


class BatchIn(Base):
    """Each item is a BatchItem ({"idempotency_key"?, "notification": {...}}); it is checked alone, so an item of the
    wrong shape fails alone (its error in the answer) and the others are still submitted."""

    items: Annotated[
        list[Any],
        Meta(min_length=1, max_length=1000, description='Each {"idempotency_key"?: string, "notification": NotificationIn}'),
    ]


class BatchError(Base):
    type: str
    detail: str
    field: str | None = None


class BatchResult(Base):
    index: int
    outcome: Literal["accepted", "replayed", "error"]
    status: int
    body: NotificationAccepted | None = None
    error: BatchError | None = None


class BatchOut(Base):
    items: list[BatchResult]
    accepted: int
    replayed: int
    failed: int
    test: bool | None = None  # true: submitted with a test key


class DeliveryEvent(Base):
    seq: int
    to: str
    source: str
    at: dt.datetime
    reason: str | None = None
    # "from" is a keyword: renamed on the wire.
    from_: str | None = msgspec.field(default=None, name="from")


class Attempt(Base):
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    outcome: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


class DeliveryOut(Base):
    id: UUID
    channel: Channel
    status: str
    attempts: int
    due_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    events: list[DeliveryEvent]
    attempt_history: list[Attempt]
    reason: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    error: dict[str, str | None] | None = None
    expires_at: dt.datetime | None = None
    sent_at: dt.datetime | None = None
    delivered_at: dt.datetime | None = None
    read_at: dt.datetime | None = None
    opened_at: dt.datetime | None = None  # e-mail: the first open or click reported; a flag, not a status
    recipient: str | None = None
    finished_at: dt.datetime | None = None
    test: bool | None = None  # true: a test key's delivery, sent by the mock provider only
    pricing: dict[str, Any] | None = None  # what the provider said it cost (WhatsApp: pricing_model, category, billable, type)
    step: int | None = None  # its place in the request's route, when it has one


class NotificationOut(Base):
    """`summary` counts the deliveries by channel, status and reason; up to 100 deliveries are also inline with their
    history; a larger fan-out says `deliveries_omitted` (read them with GET /internal/notifications/{id}/deliveries)."""

    id: UUID
    status: Literal["in_progress", "completed"]
    created_at: dt.datetime
    template: str
    channels: list[Channel]
    metadata: dict[str, Any]
    delivery_count: int
    summary: list[DeliveryCount]
    deliveries: list[DeliveryOut] | None = None
    deliveries_omitted: bool = False
    recipient: str | None = None
    recipient_count: int | None = None
    idempotency_key: str | None = None
    category: str | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    http_request_id: str | None = None
    callback_url: str | None = None
    test: bool | None = None  # true: submitted with a test key
    route: list[RouteStep] | None = None  # the fallback route, normalized (until filled in), when it has one
    priority: Priority | None = None


class DeliveryPage(Base):
    """One page of a notification's deliveries; `next_cursor` null on the last."""

    items: list[DeliveryOut]
    next_cursor: str | None = None


class FoundDelivery(Base):
    id: UUID
    channel: Channel
    status: str
    updated_at: dt.datetime
    reason: str | None = None
    step: int | None = None


class FoundNotification(Base):
    """`deliveries`: of the one recipient (a single intent, or the `recipient` filtered for within a fan-out)."""

    id: UUID
    created_at: dt.datetime
    template: str
    channels: list[Channel]
    recipient: str | None = None
    recipient_count: int | None = None
    idempotency_key: str | None = None
    category: str | None = None
    metadata: dict[str, Any] | None = None
    deliveries: list[FoundDelivery] | None = None
    route: list[RouteStep] | None = None


class NotificationPage(Base):
    """Newest first. A page may hold fewer items than `limit` (each call reads at most 1,000 candidates) while
    `next_cursor` is set: the end is `next_cursor` null."""

    items: list[FoundNotification]
    next_cursor: str | None = None


class CancelledDelivery(Base):
    id: UUID
    channel: Channel
    status: str
    cancelled: bool
    reason: str


class CancelResult(Base):
    id: UUID
    deliveries: list[CancelledDelivery]


class RecipientPut(Base):
    addresses: Addresses | None = None
    locale: Locale | None = None
    timezone: Annotated[str, Meta(max_length=64)] | None = None


class RecipientOut(Base):
    ref: str
    addresses: dict[str, str]
    created_at: dt.datetime
    updated_at: dt.datetime
    locale: str | None = None
    timezone: str | None = None


class Resolution(Base):
    status: Literal["sent", "failed"]
    note: Annotated[str, Meta(min_length=1, max_length=500)]


class UnknownDeadlinePut(Base):
    """Seconds a delivery may stay unknown before it becomes failed; null: the default (7 days; e-mail 1 day)."""

    after_seconds: Annotated[int, Meta(ge=60, le=31_536_000)] | None


class UnknownDeadlineOut(Base):
    channel: Channel
    after_seconds: int
    default: bool


class Suppression(Base):
    channel: Channel
    category: str | None = None


class ErasureReceipt(Base):
    """`rows_changed`: per table, the rows the erasure changed or removed. `in_flight`: deliveries being sent at the
    time (not cancellable); erase again once they finish. `suppressed`: what stays opted out, by keyed hash."""

    id: UUID
    ref: str
    erased_at: dt.datetime
    rows_changed: dict[str, int]
    in_flight: int
    suppressed: list[Suppression]
    erased_by: str | None = None


class RecipientExport(Base):
    exported_at: dt.datetime
    recipient: dict[str, Any]
    consents: dict[str, Any]
    notifications: list[dict[str, Any]]
    mock_messages: list[dict[str, Any]]
    erasures: list[dict[str, Any]]


class ConsentIn(Base):
    channel: Channel
    status: Literal["granted", "revoked"]
    source: Annotated[str, Meta(min_length=1, max_length=200)]
    category: Annotated[str, Meta(max_length=100)] | None = None
    evidence: dict[str, Any] | None = None


class ConsentEntry(Base):
    id: int
    channel: Channel
    status: Literal["granted", "revoked"]
    source: str
    recorded_at: dt.datetime
    category: str | None = None
    evidence: dict[str, Any] | None = None
    recorded_by: str | None = None


class CategoryConsent(Base):
    category: str
    allowed: bool


class ConsentState(Base):
    """`allowed`: messages without a category (and categories not listed); `categories`: each category the ledger names."""

    channel: Channel
    allowed: bool
    policy: Literal["opt_in", "opt_out"]
    categories: list[CategoryConsent]


class ConsentsOut(Base):
    ref: str
    current: list[ConsentState]
    history: list[ConsentEntry]


class EmailContent(Base):
    subject: Annotated[str, Meta(min_length=1, max_length=998)]
    text: Annotated[str, Meta(min_length=1)]
    html: str | None = None


class WhatsAppButton(Base):
    sub_type: Literal["quick_reply", "url"]
    index: int
    parameter: str


class WhatsAppContent(Base):
    """An approved template (name, language, variables mapped to body, header and button parameters) or free-form text."""

    name: Annotated[str, Meta(max_length=512)] | None = None
    language: Annotated[str, Meta(max_length=16)] | None = None
    parameters: list[str] | None = None
    header_parameters: list[str] | None = None
    buttons: list[WhatsAppButton] | None = None
    text: Annotated[str, Meta(max_length=4096)] | None = None
    # Meta's category of the approved template; a marketing one needs marketing consent (followed from Meta's webhooks)
    category: Literal["marketing", "utility", "authentication"] | None = None


class SmsContent(Base):
    text: Annotated[str, Meta(min_length=1, max_length=1600)]


class TemplateChannels(Base):
    email: EmailContent | None = None
    whatsapp: WhatsAppContent | None = None
    sms: SmsContent | None = None


class TemplatePut(Base):
    channels: TemplateChannels
    locale: Locale | None = None


class TemplateOut(Base):
    key: str
    channel: Channel
    locale: str
    content: dict[str, Any]
    required_variables: list[str]
    version: int
    updated_at: dt.datetime
    # In the answer of a save, on its sms template: what its fixed text costs, and warnings (UCS-2, several segments).
    sms: dict[str, Any] | None = None
    warnings: list[dict[str, str]] | None = None


class PolicyPut(Base):
    policy: Literal["opt_in", "opt_out"]


class PolicyOut(Base):
    channel: Channel
    policy: Literal["opt_in", "opt_out"]
    default: bool | None = None
    updated_at: dt.datetime | None = None


class ProviderPut(Base):
    provider: ProviderName
    settings: dict[str, Any] | None = None
    # References only ("env:NAME" or "file:/path"); the database refuses anything else, naming the secret.
    secrets: dict[str, str] | None = None


class ProvidersPut(Base):
    """A channel's whole failover chain, the primary first (PUT /internal/channels/{channel}/providers)."""

    providers: Annotated[list[ProviderPut], Meta(min_length=1, max_length=5)]


class ProviderHealthOut(Base):
    """How a chained provider has been doing (notify.provider_health): demoted providers are tried after the healthy ones."""

    demoted: bool
    errors: int
    demotions: int
    demoted_until: dt.datetime | None = None
    last_error_code: str | None = None
    last_error_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None


class ChainEntryOut(Base):
    position: int
    provider: str
    settings: dict[str, Any]
    secrets: dict[str, str]
    health: ProviderHealthOut
    updated_at: dt.datetime | None = None


class ProviderOut(Base):
    channel: Channel
    provider: str
    settings: dict[str, Any]
    secrets: dict[str, str]
    default: bool
    updated_at: dt.datetime | None = None
    chain: list[ChainEntryOut] = []  # the failover chain in order (position 0 is the provider above); empty: the mock


class CallbacksPut(Base):
    url: Annotated[str, Meta(min_length=8, max_length=2000)] | None = None
    retry_schedule_ms: Annotated[list[Annotated[int, Meta(ge=0, le=86_400_000)]], Meta(min_length=1, max_length=20)] | None = None
    enabled: bool | None = None


class CallbacksOut(Base):
    enabled: bool
    retry_schedule_ms: list[int]
    created_at: dt.datetime
    updated_at: dt.datetime
    url: str | None = None
    secret: str | None = None  # only when created or rotated
    previous_secret_valid_until: dt.datetime | None = None


class SecretRotation(Base):
    overlap_seconds: Annotated[int, Meta(ge=0, le=604_800)] = 86_400


class CallbackAttempt(Base):
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime
    outcome: Literal["delivered", "retry", "failed", "refused"]
    status_code: int | None = None
    error: str | None = None


class CallbackMessage(Base):
    id: UUID
    delivery_id: UUID
    sequence: int
    status: Literal["pending", "sending", "delivered", "failed"]
    url: str
    event: dict[str, Any]
    attempts: int
    created_at: dt.datetime
    attempt_history: list[CallbackAttempt]
    next_attempt_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    last_error: str | None = None


class MockMessage(Base):
    delivery_id: UUID
    attempt: int
    channel: Channel
    address: str
    provider_message_id: str
    rendered: dict[str, Any]
    sent_at: dt.datetime


class WebhookAck(Base):
    stored: bool
    duplicate: bool


class Health(Base):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]


class Version(Base):
    version: str
    schema: str
    api: str = "v1"


class Problem(Base):
    type: str
    title: str
    status: int
    detail: str | None = None
    field: str | None = None
    instance: str | None = None


class RetentionPeriods(Base):
    content_days: int | None = None
    history_days: int | None = None


class RetentionChannels(Base):
    whatsapp: RetentionPeriods | None = None
    email: RetentionPeriods | None = None
    sms: RetentionPeriods | None = None


class RetentionPut(Base):
    # Days, 1 to 3650, history at least content: checked by notify_api.set_retention_v1, which names the field.
    content_days: int | None = None
    history_days: int | None = None
    channels: RetentionChannels | None = None


class RetentionInForce(Base):
    content_days: int
    history_days: int
    override: bool


class RetentionOut(Base):
    content_days: int
    history_days: int
    channels: dict[str, RetentionInForce]
    defaults: RetentionPeriods
    default: bool
    updated_at: dt.datetime | None = None


# Quiet hours and frequency caps (/internal/quiet-hours, /internal/frequency-caps): the SQL functions check every rule
# again (HH:MM times, IANA time zones, ISO 8601 periods of PT1S to P31D) and name the field.
ClockTime = Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["21:00"])]


class QuietWindow(Base):
    start: ClockTime | None = None
    end: ClockTime | None = None
    exempt: bool | None = None


class QuietHoursPut(Base):
    timezone: Annotated[str, Meta(max_length=64, examples=["Europe/Madrid"])] | None = None
    start: ClockTime | None = None
    end: ClockTime | None = None
    categories: dict[str, QuietWindow] | None = None


class QuietHoursDefaults(Base):
    timezone: str
    start: str | None = None
    end: str | None = None
    categories: dict[str, QuietWindow] = {}


class QuietHoursOut(Base):
    timezone: str | None
    start: str | None
    end: str | None
    categories: dict[str, QuietWindow]
    default: bool
    defaults: QuietHoursDefaults
    updated_at: dt.datetime | None = None


class FrequencyCap(Base):
    max: Annotated[int, Meta(ge=1, le=10000)]
    period: Annotated[str, Meta(max_length=32, examples=["P1D"])]
    channel: Channel | None = None
    category: Annotated[str, Meta(min_length=1, max_length=100)] | None = None
    action: Literal["suppress", "hold"] | None = None


class FrequencyCapsPut(Base):
    caps: Annotated[list[FrequencyCap], Meta(max_length=20)]


class FrequencyCapsDefaults(Base):
    caps: list[FrequencyCap]
    action: str


class FrequencyCapsOut(Base):
    caps: list[FrequencyCap]
    default: bool
    defaults: FrequencyCapsDefaults
    updated_at: dt.datetime | None = None


class NotificationPreview(Base):
    """The dry run of a submission (POST /internal/notifications/preview): nothing is written. `outcome` is what the
    submission would answer (accepted, suppressed, or refused with the error in `refused`); each delivery (per
    recipient and channel) says whether it would be sent, when, through which provider, its rendered content, or every
    reason it would not be (docs/sql-api.md, "Dry run")."""

    preview: bool
    outcome: Literal["accepted", "suppressed", "refused"]
    previewed_at: dt.datetime
    template: str
    deliveries: list[dict[str, Any]]
    refused: dict[str, Any] | None = None
    test: bool | None = None
    category: str | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    recipient_count: int | None = None
