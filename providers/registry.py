"""Which provider serves a channel, and which adapter parses a provider's webhooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher.settings import Settings
from providers.base import Provider, WebhookAdapter
from providers.mock import MockProvider, MockWebhooks


def provider_for(channel: str, settings: Settings, record_mock: Callable[[list[dict[str, Any]]], Awaitable[None]]) -> Provider:
    """The mock provider for every channel until real providers are configured per tenant (issue: real channels)."""
    return MockProvider(
        record=record_mock,
        webhook_url=settings.mock_webhook_url,
        webhook_secret=settings.mock_webhook_secret,
        latency_ms=settings.mock_latency_ms,
        failure_rate=settings.mock_failure_rate,
        status_delay_ms=settings.mock_status_delay_ms,
        outcomes=settings.mock_outcomes,
    )


def webhook_adapters(settings: Settings) -> dict[str, WebhookAdapter]:
    secrets_ = [s for s in (settings.mock_webhook_secret or "").split() if s]
    return {"mock": MockWebhooks(secrets_, settings.webhook_tolerance_seconds)}
