"""The contract between the worker and a provider, and between the webhook route and a provider adapter."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol
from uuid import UUID

import msgspec

Outcome = Literal["sent", "retry", "failed", "unknown", "suppressed", "bounced"]


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


class SendResult(msgspec.Struct, kw_only=True, frozen=True):
    """What happened to one provider call; becomes a notify.attempt_result."""

    outcome: Outcome
    provider: str
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_seconds: float | None = None


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


class InboundMessage(msgspec.Struct, kw_only=True, frozen=True):
    """A message a recipient sent us (WhatsApp); becomes a notify.inbound_message."""

    phone_number_id: str
    sender: str
    message_id: str
    text: str | None = None
    received_at: dt.datetime | None = None


class ParsedWebhook(msgspec.Struct, kw_only=True, frozen=True):
    """A verified webhook: its dedup key, the payload to store, its status events and inbound messages."""

    event_key: str
    payload: Any
    events: list[StatusEvent]
    inbound: list[InboundMessage] = []


@dataclasses.dataclass(frozen=True)
class ProviderContext:
    """What a provider may use of the worker: shared pacing, the mock outbox, settings."""

    take_tokens: Callable[[str, float, int], Awaitable[int]]
    record_mock: Callable[[list[dict[str, Any]]], Awaitable[None]]
    settings: Any


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


class WebhookAdapter(Protocol):
    provider: str

    def parse(self, headers: dict[str, str], body: bytes) -> ParsedWebhook:
        """Verifies the raw body and returns what to store; raises WebhookRejected."""
        ...
