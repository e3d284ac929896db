"""Typed answers of the /internal API (msgspec structs). Unknown fields are ignored, so a newer server does not
break an older client; fields the server may omit are optional."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal
from uuid import UUID

import msgspec

# The server's channels (providers.base.CHANNELS, the enum notify.channel): a copy, since the client imports nothing of the
# server; tests/providers/test_registry.py checks it against the database.
Channel = Literal["whatsapp", "email", "sms"]


class Model(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


# -- requests ----------------------------------------------------------------------------------------------------
class Recipient(Model):
    ref: str
    addresses: dict[str, str | None] | None = None
    locale: str | None = None
    timezone: str | None = None


class FanoutRecipient(Recipient):
    variables: dict[str, Any] | None = None


Priority = Literal["high", "normal", "bulk"]


class RouteStep(Model):
    """A step of a fallback route: `until` (sent, delivered or read; the server's default is delivered) is the status
    that makes the later steps unnecessary; `within` (an ISO 8601 duration, e.g. "PT15M") how long after being sent
    it may take before the next step is sent anyway. The last step needs neither."""

    channel: Channel
    until: Literal["sent", "delivered", "read"] | None = None
    within: str | None = None


class Intent(Model):
    """What to send: to `recipient` (one) or `recipients` (a fan-out of up to 10,000), on every one of `channels`, or
    along a fallback `route` (exactly one of the two); `priority` high, normal (the default) or bulk."""

    template: str
    channels: list[Channel] | None = None
    route: list[RouteStep] | None = None
    priority: Priority | None = None
    recipient: Recipient | None = None
    recipients: list[FanoutRecipient] | None = None
    variables: dict[str, Any] | None = None
    category: str | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None


# -- answers -----------------------------------------------------------------------------------------------------
class DeliverySummary(Model):
    id: UUID
    channel: Channel
    status: str
    reason: str | None = None
    step: int | None = None  # its place in the route, when the intent has one


class DeliveryCount(Model):
    channel: Channel
    status: str
    count: int
    reason: str | None = None


class Accepted(Model):
    """The answer to a submission: `deliveries` for one recipient, `recipient_count` and `summary` for a fan-out.
    `replayed` is true when the idempotency key had been used before (with the same body)."""

    id: UUID
    status: Literal["accepted", "suppressed"]
    created_at: dt.datetime
    deliveries: list[DeliverySummary] | None = None
    recipient_count: int | None = None
    summary: list[DeliveryCount] | None = None
    replayed: bool = False
    test: bool = False  # submitted with a test key: sent by the mock provider only


class PreviewReason(Model):
    """Why a previewed delivery would not be sent (or, with `at` "claim", would be refused when the worker claims it):
    no_address, no_consent, template_not_found, missing_variables (`variables`), render_failed,
    outside_customer_service_window, and the policies' reasons."""

    reason: str
    detail: str | None = None
    at: str | None = None
    variables: list[str] | None = None
    channel: str | None = None
    step: int | None = None  # route_step_waiting: the step this one waits on
    until: dt.datetime | None = None
    cap: dict[str, Any] | None = None  # frequency_cap: {max, period, count, channel, category, action}
    quiet_hours: dict[str, Any] | None = None  # quiet_hours_past_expiry: {start, end, timezone, category}
    pair_rate_limit: dict[str, Any] | None = None


class PreviewDelivery(Model):
    """One delivery of a dry run (per recipient and channel). `consent`, `locale`, `template`, `provider` and
    `address` are objects as documented in docs/sql-api.md ("Dry run"); `rendered` is the content a send would render."""

    recipient: str
    channel: Channel
    would_send: bool
    status: str
    recipient_known: bool
    reasons: list[PreviewReason]
    provider: dict[str, Any]
    address: dict[str, Any]
    consent: dict[str, Any]
    locale: dict[str, Any]
    template: dict[str, Any]
    variables: dict[str, Any]
    reason: str | None = None  # the reason the submission would record (no_address, no_consent, step_1_suppressed)
    index: int | None = None
    step: int | None = None  # its place in the route, when the intent gave one
    condition: str | None = None  # a waiting route step: when it would be sent
    policy: dict[str, Any] | None = None  # the tenant policies' decision: {decision, reason, until, detail, holds, sends_at}
    sends_at: dt.datetime | None = None  # when it would be sent (after any hold)
    due_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    timezone: str | None = None
    missing_variables: list[str] | None = None
    rendered: dict[str, Any] | None = None


class Preview(Model):
    """The dry run of a submission: nothing was written. `outcome` is what the submission would answer; `refused` its
    error when it would be refused (a template or variables missing)."""

    preview: bool
    outcome: Literal["accepted", "suppressed", "refused"]
    previewed_at: dt.datetime
    template: str
    deliveries: list[PreviewDelivery]
    refused: dict[str, Any] | None = None
    test: bool = False
    category: str | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    recipient_count: int | None = None


class DeliveryEvent(Model):
    seq: int
    to: str
    at: dt.datetime
    source: str
    reason: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")


class Attempt(Model):
    attempt: int
    started_at: dt.datetime
    outcome: str | None = None
    provider: str | None = None
    finished_at: dt.datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    provider_message_id: str | None = None


class Delivery(Model):
    id: UUID
    channel: Channel
    status: str
    attempts: int = 0
    reason: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    sent_at: dt.datetime | None = None
    delivered_at: dt.datetime | None = None
    read_at: dt.datetime | None = None
    opened_at: dt.datetime | None = None  # e-mail: the first open or click a provider reported (a flag, not a status)
    finished_at: dt.datetime | None = None
    events: list[DeliveryEvent] = []
    attempt_history: list[Attempt] = []
    test: bool = False  # a test key's delivery
    pricing: dict[str, Any] | None = None  # what the provider said it cost (WhatsApp status pricing)
    recipient: str | None = None
    step: int | None = None  # its place in the route, when the notification has one


class Notification(Model):
    """`summary` counts the deliveries by channel and status. Up to 100 deliveries come inline; a larger fan-out has
    `deliveries_omitted` and its deliveries come page by page from `Client.list_deliveries`."""

    id: UUID
    status: Literal["in_progress", "completed"]
    created_at: dt.datetime
    template: str
    channels: list[Channel]
    deliveries: list[Delivery] = []
    summary: list[DeliveryCount] = []
    delivery_count: int | None = None
    deliveries_omitted: bool = False
    metadata: dict[str, Any] = {}
    recipient: str | None = None
    recipient_count: int | None = None
    idempotency_key: str | None = None
    category: str | None = None
    send_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    http_request_id: str | None = None
    callback_url: str | None = None
    test: bool = False  # submitted with a test key
    route: list[RouteStep] | None = None  # the fallback route (until filled in), when it has one
    priority: Priority = "normal"


class DeliveryPage(Model):
    items: list[Delivery]
    next_cursor: str | None = None


class FoundDelivery(Model):
    id: UUID
    channel: Channel
    status: str
    updated_at: dt.datetime | None = None
    reason: str | None = None
    step: int | None = None


class FoundNotification(Model):
    id: UUID
    created_at: dt.datetime
    template: str
    channels: list[Channel]
    recipient: str | None = None
    recipient_count: int | None = None
    idempotency_key: str | None = None
    category: str | None = None
    metadata: dict[str, Any] | None = None
    deliveries: list[FoundDelivery] = []
    route: list[RouteStep] | None = None


class NotificationPage(Model):
    """Newest first; a page may be short while `next_cursor` is set (the end is `next_cursor` None)."""

    items: list[FoundNotification]
    next_cursor: str | None = None


class CancelledDelivery(Model):
    id: UUID
    channel: Channel
    status: str
    cancelled: bool
    reason: str | None = None


class CancelResult(Model):
    id: UUID
    deliveries: list[CancelledDelivery]


class BatchError(Model):
    type: str
    detail: str
    field: str | None = None


class BatchItemResult(Model):
    index: int
    outcome: Literal["accepted", "replayed", "error"]
    status: int
    body: Accepted | None = None
    error: BatchError | None = None


class BatchResult(Model):
    items: list[BatchItemResult]
    accepted: int
    replayed: int
    failed: int
    test: bool = False


class RecipientOut(Model):
    ref: str
    addresses: dict[str, str]
    created_at: dt.datetime
    updated_at: dt.datetime
    locale: str | None = None
    timezone: str | None = None


class ConsentEntry(Model):
    id: int
    channel: Channel
    status: Literal["granted", "revoked"]
    source: str
    recorded_at: dt.datetime
    category: str | None = None
    evidence: dict[str, Any] | None = None
    recorded_by: str | None = None


class CategoryConsent(Model):
    category: str
    allowed: bool


class ConsentInForce(Model):
    """`allowed` is the channel's state for messages without a category (and for any category not listed);
    `categories` is the state in force for each category the recipient's ledger names on this channel."""

    channel: Channel
    allowed: bool
    policy: Literal["opt_in", "opt_out"]
    categories: list[CategoryConsent] = []


class Suppression(Model):
    channel: Channel
    category: str | None = None


class ErasureReceipt(Model):
    id: UUID
    ref: str
    erased_at: dt.datetime
    rows_changed: dict[str, int]
    in_flight: int = 0
    suppressed: list[Suppression] = []
    erased_by: str | None = None


class Consents(Model):
    ref: str
    current: list[ConsentInForce]
    history: list[ConsentEntry]


class Template(Model):
    key: str
    channel: Channel
    locale: str
    content: dict[str, Any]
    required_variables: list[str]
    version: int = 1
    updated_at: dt.datetime | None = None
    # In the answer of a save, on its sms template: what its fixed text costs ({encoding: GSM-7|UCS-2, segments, units})
    # and warnings ([{code: sms_ucs2|sms_segments, message}]) when it needs UCS-2 or more than one segment.
    sms: dict[str, Any] | None = None
    warnings: list[dict[str, str]] | None = None


class Policy(Model):
    channel: Channel
    policy: Literal["opt_in", "opt_out"]
    default: bool = False
    updated_at: dt.datetime | None = None


class ProviderHealth(Model):
    """How a chained provider has been doing: a demoted one is tried after the healthy ones of its chain."""

    demoted: bool = False
    errors: int = 0
    demotions: int = 0
    demoted_until: dt.datetime | None = None
    last_error_code: str | None = None
    last_error_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None


class ChainEntry(Model):
    """One provider of a channel's failover chain (position 0: the primary)."""

    position: int
    provider: str
    settings: dict[str, Any]
    secrets: dict[str, str]
    health: ProviderHealth = msgspec.field(default_factory=ProviderHealth)
    updated_at: dt.datetime | None = None


class ProviderConfig(Model):
    channel: Channel
    provider: str
    settings: dict[str, Any]
    secrets: dict[str, str]
    default: bool
    updated_at: dt.datetime | None = None
    chain: list[ChainEntry] = []  # the failover chain in order; empty for the built-in mock


class Callbacks(Model):
    enabled: bool
    retry_schedule_ms: list[int]
    created_at: dt.datetime
    updated_at: dt.datetime
    url: str | None = None
    secret: str | None = None
    previous_secret_valid_until: dt.datetime | None = None


class CallbackAttempt(Model):
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime
    outcome: str
    status_code: int | None = None
    error: str | None = None


class CallbackMessage(Model):
    id: UUID
    delivery_id: UUID
    sequence: int
    status: str
    url: str
    event: dict[str, Any]
    attempts: int
    created_at: dt.datetime
    attempt_history: list[CallbackAttempt] = []
    next_attempt_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    last_error: str | None = None


class MockMessage(Model):
    delivery_id: UUID
    attempt: int
    channel: Channel
    address: str
    provider_message_id: str
    rendered: dict[str, Any]
    sent_at: dt.datetime


# -- status callbacks (what the dispatcher posts to the caller) ---------------------------------------------------
class StatusChange(Model):
    notification_id: UUID
    delivery_id: UUID
    sequence: int
    channel: Channel
    status: str
    previous_status: str | None = None
    reason: str | None = None
    attempt: int | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    metadata: dict[str, Any] | None = None
    http_request_id: str | None = None
    test: bool = False  # a test key's delivery


class CallbackEvent(Model):
    type: str
    timestamp: dt.datetime
    data: StatusChange
    webhook_id: str = ""


# -- policies (/internal/quiet-hours, /internal/frequency-caps) ----------------------------------------------------
class QuietWindow(Model):
    """A category's own quiet hours (start, end: HH:MM local time), or exempt: sent at once."""

    start: str | None = None
    end: str | None = None
    exempt: bool | None = None


class QuietHours(Model):
    """Quiet hours in force: the default window (start, end), per-category windows, the time zone of recipients without
    one (None: UTC). `default`: nothing is set."""

    categories: dict[str, QuietWindow]
    default: bool
    timezone: str | None = None
    start: str | None = None
    end: str | None = None
    defaults: dict[str, Any] | None = None
    updated_at: dt.datetime | None = None


class FrequencyCap(Model):
    """At most `max` messages per recipient in any sliding `period` (ISO 8601, PT1S to P31D), counting only `channel`
    and `category` when given; over it suppressed (action "suppress", the default) or held until the cap frees ("hold")."""

    max: int
    period: str
    channel: Channel | None = None
    category: str | None = None
    action: Literal["suppress", "hold"] | None = None


class FrequencyCaps(Model):
    caps: list[FrequencyCap]
    default: bool
    defaults: dict[str, Any] | None = None
    updated_at: dt.datetime | None = None
