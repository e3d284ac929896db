"""Which provider serves a channel, and which adapter parses a provider's webhooks."""

from __future__ import annotations

from typing import Any

from providers.base import KeyedWebhookAdapter, Provider, ProviderContext, ProviderSettings, WebhookAdapter
from providers.email_webhooks import MailgunWebhooks, SendGridWebhooks
from providers.mock import MockProvider, MockWebhooks
from providers.secrets import Grants
from providers.smtp import Smtp
from providers.twilio import Twilio, TwilioWebhooks
from providers.whatsapp import WhatsAppCloud, WhatsAppWebhooks


def provider_for(name: str, config: dict[str, Any] | None, ctx: ProviderContext) -> Provider:
    """A provider instance for a tenant's channel configuration (notify.channel_providers); mock without one."""
    config = config or {}
    settings, secrets = dict(config.get("settings") or {}), dict(config.get("secrets") or {})
    grants = Grants.of(config.get("grants"))  # the operator's grant, from the claim: checked again at every send
    if name == "whatsapp_cloud":
        return WhatsAppCloud(settings, secrets, ctx, grants)
    if name == "smtp":
        return Smtp(settings, secrets, ctx, grants)
    if name == "twilio":
        return Twilio(settings, secrets, ctx, grants)
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
        test=bool(config.get("test")),  # the claim's config of a test delivery (sql/080_api_worker.sql)
        channel_rules=ctx.channel_rules,
    )


def webhook_adapters(settings: ProviderSettings | object) -> dict[str, WebhookAdapter | KeyedWebhookAdapter]:
    """The webhook adapters, from the providers' settings (or a whole Settings, of which only that part is read)."""
    settings = ProviderSettings.of(settings)
    tolerance = settings.webhook_tolerance_seconds
    return {
        "mock": MockWebhooks([s for s in (settings.mock_webhook_secret or "").split() if s], tolerance),
        "whatsapp": WhatsAppWebhooks(settings.whatsapp_app_secrets),
        "sendgrid": SendGridWebhooks(settings.sendgrid_verification_key, tolerance),
        "mailgun": MailgunWebhooks(settings.mailgun_signing_key, tolerance),
        "twilio": TwilioWebhooks(settings.public_url),
    }
