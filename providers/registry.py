"""The one registration of provider kinds and the one list of channels, from which everything else is derived: which
provider serves a channel (`provider_for`, the worker), which adapter parses a webhook route (`webhook_adapters`, the
API), which setting is an endpoint (providers.secrets.check_endpoints), the API's and the CLI's choices.

Adding a provider: its module (sending, webhooks, and its `KIND` at the bottom), one line in KINDS below, and the
database's side (a migration) — docs/architecture.md, "Adding a provider or a channel"."""

from __future__ import annotations

from typing import Any

from providers import email_webhooks, mock, smtp, twilio, whatsapp
from providers.base import CHANNELS, Provider, ProviderConfig, ProviderContext, ProviderKind, ProviderSettings, WebhookAdapter
from providers.secrets import Grants

# Every provider kind, once. Its module declares what it is (name, channels, factory, webhooks, endpoint, settings).
KINDS: dict[str, ProviderKind] = {
    kind.name: kind
    for kind in (
        mock.KIND,
        whatsapp.KIND,
        smtp.KIND,
        twilio.KIND,
        email_webhooks.SENDGRID,
        email_webhooks.MAILGUN,
    )
}

# What a tenant may configure for a channel (PUT /internal/channels/{channel}/provider): the kinds that send.
PROVIDERS: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if kind.make is not None)

__all__ = ["CHANNELS", "KINDS", "PROVIDERS", "kind", "provider_for", "webhook_adapters", "webhooks_needing_public_url"]


def kind(name: str) -> ProviderKind | None:
    return KINDS.get(name)


def provider_for(name: str, config: dict[str, Any] | None, ctx: ProviderContext) -> Provider:
    """A provider instance for a tenant's channel configuration (notify.channel_providers); mock without one."""
    config = config or {}
    found = KINDS.get(name)
    if found is None or found.make is None:
        found = mock.KIND  # the claim names no provider the worker knows (the database allows none other)
    return found.make(  # type: ignore[misc]
        ProviderConfig(
            settings=dict(config.get("settings") or {}),
            secrets=dict(config.get("secrets") or {}),
            # the operator's grant, from the claim: checked again at every send
            grants=Grants.of(config.get("grants")),
            test=bool(config.get("test")),  # the claim's config of a test delivery (sql/080_api_worker.sql)
        ),
        ctx,
    )


def webhook_adapters(settings: ProviderSettings | object) -> dict[str, WebhookAdapter]:
    """The webhook adapters by route name (/public/webhooks/{route}), from the providers' settings (or a whole Settings,
    of which only that part is read). Raises ConfigurationError for a secret that cannot work."""
    settings = ProviderSettings.of(settings)
    return {hook.route: hook.make(settings) for kind in KINDS.values() for hook in kind.webhooks}


def webhooks_needing_public_url() -> list[str]:
    """The webhook routes whose provider signs the public URL (they cannot be verified without DISPATCHER_PUBLIC_URL)."""
    return [hook.route for kind in KINDS.values() for hook in kind.webhooks if hook.needs_public_url]
