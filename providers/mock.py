"""The built-in mock provider: the default for every channel until a real one is configured.

Sending: records each message it "sends" (notify.mock_messages, via a callback so this module needs no
database code), returns a provider message id, and after a delay posts signed Standard Webhooks status
reports (sent -> delivered -> read; e-mail stops at delivered) to /public/webhooks/mock.
Latency, a random transient failure rate and per-address scripted outcomes are configurable.

Webhooks: `MockWebhooks.parse` verifies the signature over the raw bytes and normalizes the reports.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import msgspec

from providers import standard_webhooks
from providers.base import (
    CHANNELS,
    DeploymentKeyed,
    Message,
    ParsedWebhook,
    ProviderConfig,
    ProviderContext,
    ProviderKind,
    SendResult,
    StatusEvent,
    Webhook,
    WebhookRejected,
    WebhookRequest,
    obj,
    parse_correlation_id,
    salvage,
    text,
    why,
)

NAME = "mock"
log = logging.getLogger("providers.mock")

# Scripted outcomes by address, for demos and tests (DISPATCHER_MOCK_OUTCOMES='{"+34600000001": "failed"}'):
#   failed        refused at once (permanent)           retry     503 every time (transient)
#   unknown       times out after the request left us   async_failed  accepted, then a "failed" report
#   delivered     accepted, reports stop at delivered   silent    accepted, no reports at all
SCRIPTED = {"failed", "retry", "unknown", "async_failed", "delivered", "silent"}

# Magic addresses (README "Test keys and magic addresses"): the same outcome every time, whoever sends, so a caller's
# test suite can produce each outcome with a test key. Phone numbers in the fictional range +1 NPA 555-01XX (any area
# code), by the last two digits; e-mail addresses <outcome>[+<error code>]@simulator.dispatcher.test.
MAGIC_PHONES = {
    "00": "delivered",  # accepted; reports sent, delivered
    "01": "read",  # accepted; reports sent, delivered, read
    "02": "async_failed",  # accepted; reports sent, then failed with error 131026 (message undeliverable)
    "03": "failed",  # refused at once (permanent), error mock_rejected
    "04": "unknown",  # no answer after the request left: unknown until a report says otherwise (none comes)
    "05": "slow",  # like 01, but the answer and every report take SLOW_SECONDS
    "06": "retry",  # 503 every time: retried until the tenant's attempts run out, then failed
}
MAGIC_EMAIL_DOMAIN = "simulator.dispatcher.test"
MAGIC_EMAILS = {"delivered", "failed", "bounced", "unknown", "slow", "retry"}
PHONE_FAILED_CODE = "131026"
SLOW_SECONDS = 2.0
_MAGIC_PHONE = re.compile(r"^\+1[2-9][0-9]{2}55501([0-9]{2})$")
_MAGIC_EMAIL = re.compile(r"^([a-z]+)(?:\+([A-Za-z0-9_.-]{1,40}))?@" + re.escape(MAGIC_EMAIL_DOMAIN) + "$", re.IGNORECASE)


def magic(address: str) -> tuple[str, str | None] | None:
    """The documented outcome of a magic address and the provider error code it gives, or None for any other address."""
    phone = _MAGIC_PHONE.match(address)
    if phone:
        outcome = MAGIC_PHONES.get(phone.group(1))
        return (outcome, PHONE_FAILED_CODE if outcome == "async_failed" else None) if outcome else None
    email = _MAGIC_EMAIL.match(address)
    if email and email.group(1).lower() in MAGIC_EMAILS:
        return email.group(1).lower(), email.group(2)
    return None


class StatusData(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    message_id: str
    correlation_id: str | None = None
    status: str
    error: dict[str, str] | None = None


class StatusPayload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    timestamp: dt.datetime
    data: StatusData


_encode = msgspec.json.Encoder().encode


class MockProvider:
    """Sends nothing anywhere; behaves like a provider that accepts, then reports statuses by webhook."""

    name = NAME

    def __init__(
        self,
        *,
        record: Callable[[list[dict[str, Any]]], Awaitable[None]],
        webhook_url: str | None,
        webhook_secret: str | None,
        latency_ms: float = 0.0,
        failure_rate: float = 0.0,
        status_delay_ms: float = 200.0,
        outcomes: dict[str, str] | None = None,
        record_messages: bool = True,
        test: bool = False,
        channel_rules: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.test = test  # serves test deliveries (a test key's): the metrics say so
        # Each channel's rules as the database states them (notify_api.channel_rules_v1, loaded by the worker): a read is
        # reported only on a channel that has reads.
        self._channel_rules = channel_rules if channel_rules is not None else {}
        self._record = record
        self._url = webhook_url
        self._secret = webhook_secret
        self._latency = latency_ms / 1000.0
        self._failure_rate = failure_rate
        self._delay = status_delay_ms / 1000.0
        self._outcomes = outcomes or {}
        self._record_messages = record_messages
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._posting = asyncio.Semaphore(16)  # a burst of sends must not open thousands of webhook connections

    def _script(self, address: str) -> tuple[str | None, str | None]:
        """What the address is scripted to do (a magic address first, then DISPATCHER_MOCK_OUTCOMES), and its error code."""
        found = magic(address)
        if found is not None:
            return found
        return self._outcomes.get(address), None

    def _one(self, message: Message) -> tuple[SendResult, dict[str, Any] | None]:
        script, code = self._script(message.address)
        if script == "failed":
            return SendResult(
                outcome="failed", provider=NAME, error_code=code or "mock_rejected", error_message="recipient refused by the mock"
            ), None
        if script == "bounced":
            return SendResult(
                outcome="bounced",
                provider=NAME,
                error_code=code or "550",
                error_message="the mock's recipient server rejected it",
            ), None
        if script == "retry" or (script is None and self._failure_rate and random.random() < self._failure_rate):
            return SendResult(
                outcome="retry", provider=NAME, error_code="mock_503", error_message="mock provider unavailable"
            ), None
        if script == "unknown":
            return SendResult(
                outcome="unknown", provider=NAME, error_code="mock_timeout", error_message="no answer from the mock"
            ), None
        message_id = f"mock-{secrets.token_hex(12)}"
        row = {
            "tenant_id": str(message.tenant_id),
            "delivery_id": str(message.delivery_id),
            "attempt": message.attempt,
            "channel": message.channel,
            "address": message.address,
            "provider_message_id": message_id,
            "rendered": message.rendered,
        }
        return SendResult(outcome="sent", provider=NAME, provider_message_id=message_id), row

    async def send_many(self, messages: list[Message]) -> list[SendResult]:
        # The messages of a call wait out the latency together, as concurrent requests would: one sleep, not a task
        # per message (a task per message was a tenth of the worker's CPU at 0 ms). A "slow" magic address makes its
        # whole call slow, as one slow answer holds up a provider call.
        slow = any(self._script(m.address)[0] == "slow" for m in messages)
        if self._latency or slow:
            await asyncio.sleep(max(self._latency, SLOW_SECONDS if slow else 0.0))
        done = [self._one(m) for m in messages]
        rows = [row for _, row in done if row is not None]
        if rows and self._record_messages:
            await self._record(rows)
        for message, (result, _) in zip(messages, done, strict=True):
            if result.outcome == "sent" and result.provider_message_id:
                self._schedule_reports(message, result.provider_message_id)
        return [result for result, _ in done]

    def _schedule_reports(self, message: Message, message_id: str) -> None:
        if not self._url or not self._secret:
            return
        script, code = self._script(message.address)
        if script == "silent":
            return
        if script == "async_failed":
            statuses = ["sent", "failed"]
        elif script == "delivered" or not self._channel_rules.get(message.channel, {}).get("has_read", False):
            statuses = ["sent", "delivered"]
        else:
            statuses = ["sent", "delivered", "read"]
        delay = max(self._delay, SLOW_SECONDS) if script == "slow" else self._delay
        task = asyncio.get_running_loop().create_task(self._report(message, message_id, statuses, delay, code))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(
        self, message: Message, message_id: str, statuses: list[str], delay: float | None = None, code: str | None = None
    ) -> None:
        assert self._url and self._secret
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        for status in statuses:
            await asyncio.sleep(self._delay if delay is None else delay)
            error = {"code": code or "mock_undeliverable", "title": "the mock could not deliver"} if status == "failed" else None
            body = _encode(
                StatusPayload(
                    type=f"message.status.{status}",
                    timestamp=dt.datetime.now(dt.UTC),
                    data=StatusData(message_id=message_id, correlation_id=message.correlation_id, status=status, error=error),
                )
            )
            msg_id = f"msg_{secrets.token_hex(12)}"
            for attempt in range(5):
                try:
                    async with self._posting:
                        response = await self._client.post(
                            self._url,
                            content=body,
                            headers={"content-type": "application/json", **standard_webhooks.headers(self._secret, msg_id, body)},
                        )
                    if response.status_code < 300:
                        break
                    log.warning("mock webhook refused", extra={"status_code": response.status_code, "webhook_id": msg_id})
                except httpx.HTTPError as exc:
                    log.warning("mock webhook not delivered", extra={"error": type(exc).__name__, "webhook_id": msg_id})
                await asyncio.sleep(0.2 * 2**attempt)

    async def drain(self) -> None:
        """Waits for the status reports already scheduled (graceful shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class MockWebhooks(DeploymentKeyed):
    """Verifies and parses the mock's Standard Webhooks status reports."""

    provider = NAME

    def __init__(self, secrets_: list[str], tolerance_seconds: int = 300) -> None:
        for secret in secrets_:
            standard_webhooks.check_secret(secret, "DISPATCHER_MOCK_WEBHOOK_SECRET")
        self._secrets = secrets_
        self._tolerance = tolerance_seconds

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        if not self._secrets:
            raise WebhookRejected("mock webhooks are not configured (DISPATCHER_MOCK_WEBHOOK_SECRET)", status=404)
        body = request.body
        webhook_id = standard_webhooks.verify(self._secrets, dict(request.headers), body, self._tolerance)
        return salvage(body, webhook_id, lambda payload: self._parse(webhook_id, payload))

    @staticmethod
    def _parse(webhook_id: str, payload: Any) -> ParsedWebhook:
        """A verified report; what does not fit is kept as a note, never an error (the sender would retry)."""
        data = obj(obj(payload).get("data"))
        try:
            occurred_at = msgspec.convert(obj(payload).get("timestamp"), dt.datetime | None)
        except msgspec.ValidationError as exc:
            occurred_at, notes = None, [f"timestamp ignored: {why(exc)}"]
        else:
            notes = []
        tenant_id, delivery_id = parse_correlation_id(text(data.get("correlation_id")))
        status = data.get("status")
        if status not in ("sent", "delivered", "read", "failed"):
            return ParsedWebhook(event_key=webhook_id, payload=payload, events=[], notes=[*notes, "no known status: not applied"])
        error = obj(data.get("error"))
        event = StatusEvent(
            status=status,
            tenant_id=tenant_id,
            delivery_id=delivery_id,
            provider_message_id=text(data.get("message_id")),
            occurred_at=occurred_at,
            error_code=text(error.get("code"), 200),
            error_message=text(error.get("title")),
        )
        return ParsedWebhook(event_key=webhook_id, payload=payload, events=[event], notes=notes)


def _make(config: ProviderConfig, ctx: ProviderContext) -> MockProvider:
    s = ctx.settings
    return MockProvider(
        record=ctx.record_mock,
        webhook_url=s.mock_webhook_url,
        webhook_secret=s.mock_webhook_secret,
        latency_ms=s.mock_latency_ms,
        failure_rate=s.mock_failure_rate,
        status_delay_ms=s.mock_status_delay_ms,
        outcomes=s.mock_outcomes,
        record_messages=s.mock_record,
        test=config.test,
        channel_rules=ctx.channel_rules,
    )


KIND = ProviderKind(
    name=NAME,
    channels=CHANNELS,
    make=_make,
    webhooks=(
        Webhook(
            "mock",
            lambda s: MockWebhooks([x for x in (s.mock_webhook_secret or "").split() if x], s.webhook_tolerance_seconds),
        ),
    ),
    reads=(
        "mock_webhook_secret",
        "mock_webhook_url",
        "mock_latency_ms",
        "mock_failure_rate",
        "mock_status_delay_ms",
        "mock_outcomes",
        "mock_record",
        "webhook_tolerance_seconds",
    ),
)
